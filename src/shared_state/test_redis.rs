//! For tests: a redis-server of their own (Debian's `redis-server`, which the test setup installs).

use std::sync::Arc;
use std::time::Duration;

use super::SharedRedis;
use crate::config::RedisOptions;

/// A redis-server on a free port, killed when dropped.
pub struct LocalRedis(std::process::Child);

impl Drop for LocalRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The server, and a client of it with the key prefix `t:`.
pub async fn local_redis() -> (LocalRedis, Arc<SharedRedis>) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server (Debian package redis-server) is needed by this test");
    let server = LocalRedis(child);
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            let options = RedisOptions { url: format!("redis://127.0.0.1:{port}"), key_prefix: "t:".into(), encryption_key: None, sync_interval_ms: 5000 };
            return (server, SharedRedis::new(&options).unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("redis-server did not listen on {port}");
}
