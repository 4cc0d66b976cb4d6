//! Running nft: JSON commands on its standard input (`nft -j -f -`), JSON answers on its standard
//! output. One process per transaction, awaited without blocking the runtime, bounded in time.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// How long one nft run may take before it is given up (and killed).
const NFT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why nft did not do what it was asked.
#[derive(Debug)]
pub enum NftError {
    Spawn(std::io::Error),
    Timeout,
    Refused(String),
    Answer(String),
}

impl std::fmt::Display for NftError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NftError::Spawn(err) => write!(f, "nft could not be run: {err}"),
            NftError::Timeout => write!(f, "nft did not answer within {NFT_TIMEOUT:?}"),
            NftError::Refused(reason) => write!(f, "nft refused the commands: {reason}"),
            NftError::Answer(reason) => write!(f, "nft answered what is not JSON: {reason}"),
        }
    }
}

/// Runs `commands` (`{"nftables": [...]}`) as one transaction.
pub async fn apply(commands: &Value) -> Result<(), NftError> {
    run(&["-j", "-f", "-"], Some(commands.to_string())).await.map(|_| ())
}

/// `nft -j list …`, parsed.
pub async fn list(what: &[&str]) -> Result<Value, NftError> {
    let mut args = vec!["-j", "list"];
    args.extend_from_slice(what);
    let output = run(&args, None).await?;
    serde_json::from_str(&output).map_err(|err| NftError::Answer(err.to_string()))
}

async fn run(args: &[&str], input: Option<String>) -> Result<String, NftError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(NftError::Spawn)?;
    let run = async {
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(input.as_bytes()).await.map_err(NftError::Spawn)?;
        }
        child.wait_with_output().await.map_err(NftError::Spawn)
    };
    let output = tokio::time::timeout(NFT_TIMEOUT, run).await.map_err(|_| NftError::Timeout)??;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let reason = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("no reason given").trim().to_string();
        return Err(NftError::Refused(reason));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
