//! Automatic certificates (`certificate: 'auto'`): per route, the stored certificate is loaded at
//! start, a missing one is ordered over ACME HTTP-01 once every listener is up (failures retried
//! with backoff and reported), certificates inside the renewal threshold are renewed by a periodic
//! check, and each new certificate is installed in the route's `CertSlot` for the next handshake.
//! One order per route at a time. Certificates from `certProvisionFunction` are installed here too.
//! With `options.redis` the store is Redis, and replicas act as one: one of them orders a route at
//! a time (a lock in Redis), the others wait and load its result, and every replica swaps a new
//! certificate in at once (pub/sub) or at its next sync. Knows nothing of napi: events go out
//! through `Scripts`.

mod challenge;
mod order;
mod redis_store;
mod store;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use challenge::ChallengeStore;

use crate::config::{AcmeSettings, RouteConfig};
use crate::hooks::{CertificateEventKind, EngineEvent, Scripts};
use crate::shared_state::SharedRedis;
use crate::tls::dynamic::{CertSlot, CertSlots, LoadedCert};
use order::OrderRequest;
use redis_store::{RedisCertStore, CERT_CHANNEL};
use store::{epoch_ms, CertMeta, CertStorage, CertStore, StoredCert};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// Backoff of the automatic retries after a failed order: 1 min doubling up to 1 h.
const RETRY_FIRST: Duration = Duration::from_secs(60);
const RETRY_MAX: Duration = Duration::from_secs(60 * 60);
/// The renewal check never runs more often than this, whatever the settings say.
const MIN_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// The order lock's life in Redis: renewed every third of it while the order runs, so a replica
/// that dies mid-order holds the others back this long at most.
const ORDER_LOCK_TTL: Duration = Duration::from_secs(15);
/// How often a replica waiting for another's order looks whether the lock is gone.
const LOCK_POLL: Duration = Duration::from_millis(500);
/// An order under the lock is given up after this (validation, issuance, and the requests around
/// them), so that a hung connection to the CA cannot hold every replica back.
const ORDER_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// How long a failed order's error stands for the other replicas (`<prefix>cert-failed:<route>`).
const FAILURE_SHARED_FOR: Duration = Duration::from_secs(55);

/// What reading the store gave a route.
enum Adoption {
    Adopted,
    Nothing,
    /// What is there cannot be read (a sealed key that the configured key does not open).
    Unreadable(String),
}

/// `ICertStatus` of the API.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertStatus {
    pub domain: String,
    /// 'valid' | 'pending' | 'expired' | 'error'
    pub status: &'static str,
    /// Milliseconds since the Unix epoch.
    pub expiry_date: Option<u64>,
    pub issue_date: Option<u64>,
    /// 'acme' | 'custom' | 'static' (a route's own certificate { key, cert })
    pub source: &'static str,
    pub error: Option<String>,
}

/// One automatic-certificate route.
struct Managed {
    settings: Mutex<AcmeSettings>,
    slot: Arc<CertSlot>,
    status: Mutex<CertStatus>,
    /// The route-wide certificate served now (its dates decide renewal).
    current: Mutex<Option<LoadedCert>>,
    /// One order at a time for this route.
    ordering: tokio::sync::Mutex<()>,
    /// Why the store's certificate cannot be read (a sealed key the configured key does not
    /// open): no order is placed while it stands, since it would replace the others' certificate.
    store_error: Mutex<Option<String>>,
}

impl Managed {
    fn first_domain(&self) -> String {
        self.settings.lock().domains.first().cloned().unwrap_or_default()
    }
}

pub struct AcmeManager {
    slots: Arc<CertSlots>,
    challenges: Arc<ChallengeStore>,
    scripts: Scripts,
    managed: Mutex<HashMap<String, Arc<Managed>>>,
    /// Set while the engine runs: cancels the background orders and the renewal check at stop.
    running: Mutex<Option<CancellationToken>>,
    /// Replicas' shared state, with `options.redis`.
    shared: OnceLock<Arc<SharedRedis>>,
}

impl AcmeManager {
    pub fn new(slots: Arc<CertSlots>, scripts: Scripts) -> Arc<AcmeManager> {
        // instant-acme's HTTPS client takes the process default provider: make it ring, ours.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Arc::new(AcmeManager { slots, challenges: Arc::default(), scripts, managed: Mutex::default(), running: Mutex::default(), shared: OnceLock::new() })
    }

    /// Keeps certificates, accounts and challenge answers in Redis from now on.
    pub fn share(&self, redis: Arc<SharedRedis>) {
        self.challenges.share(redis.clone());
        let _ = self.shared.set(redis);
    }

    fn storage(&self, settings: &AcmeSettings) -> Box<dyn CertStorage> {
        let disk = CertStore::new(&settings.certificate_store);
        match self.shared.get() {
            Some(redis) => Box::new(RedisCertStore::new(redis.clone(), disk)),
            None => Box::new(disk),
        }
    }

    pub fn challenges(&self) -> Arc<ChallengeStore> {
        self.challenges.clone()
    }

    /// Takes the automatic-certificate routes of a (new) table; returns the names it did not
    /// manage before. Routes no longer there are forgotten (their slots too).
    pub fn sync_routes(&self, routes: &[RouteConfig]) -> Vec<String> {
        let wanted: HashMap<String, AcmeSettings> = routes
            .iter()
            .filter_map(|r| r.action.tls.as_ref().and_then(|tls| tls.acme.clone()))
            .map(|settings| (settings.cert_name.clone(), settings))
            .collect();
        let mut added = Vec::new();
        let mut managed = self.managed.lock();
        managed.retain(|name, _| wanted.contains_key(name));
        for (name, settings) in wanted {
            match managed.get(&name) {
                Some(existing) => *existing.settings.lock() = settings,
                None => {
                    let status = CertStatus {
                        domain: settings.domains.first().cloned().unwrap_or_default(),
                        status: "pending",
                        expiry_date: None,
                        issue_date: None,
                        source: "acme",
                        error: None,
                    };
                    managed.insert(
                        name.clone(),
                        Arc::new(Managed {
                            slot: self.slots.slot(&name),
                            settings: Mutex::new(settings),
                            status: Mutex::new(status),
                            current: Mutex::new(None),
                            ordering: tokio::sync::Mutex::new(()),
                            store_error: Mutex::new(None),
                        }),
                    );
                    added.push(name);
                }
            }
        }
        let names: Vec<&str> = managed.keys().map(String::as_str).collect();
        self.slots.retain(&names);
        added
    }

    /// Loads what the store holds for `names` (all managed routes when `None`), so the first
    /// handshakes already have it. Call before the listeners are bound.
    pub async fn load_stored(&self, names: Option<&[String]>) {
        // Side by side: with Redis unreachable each read waits for its timeout.
        let selected: Vec<_> = self.selected(names).into_iter().filter(|(_, managed)| managed.current.lock().is_none()).collect();
        futures_util::future::join_all(selected.iter().map(|(name, managed)| self.adopt_stored(name, managed, false))).await;
    }

    /// Installs the stored certificate of the route when it is for the route's domains and, with
    /// `only_newer`, differs from the one served and expires no earlier.
    async fn adopt_stored(&self, name: &str, managed: &Managed, only_newer: bool) -> Adoption {
        let settings = managed.settings.lock().clone();
        let loaded = self.storage(&settings).load(name).await;
        if let Err(err) = &loaded {
            if managed.store_error.lock().replace(err.clone()).as_ref() != Some(err) {
                tracing::error!(route = %name, error = %err, "the stored certificate cannot be read; no order is placed while it cannot");
                let mut status = managed.status.lock();
                if managed.current.lock().is_none() {
                    status.status = "error";
                }
                status.error = Some(err.clone());
            }
        } else if let Some(cleared) = managed.store_error.lock().take() {
            // Readable again (the value was replaced or removed): orders may go ahead.
            let mut status = managed.status.lock();
            if status.error.as_ref() == Some(&cleared) {
                status.error = None;
                if status.status == "error" {
                    status.status = "pending";
                }
            }
        }
        let stored = match loaded {
            Ok(Some(stored)) => stored,
            Ok(None) => return Adoption::Nothing,
            Err(err) => return Adoption::Unreadable(err),
        };
        let mut stored_domains = stored.meta.domains.clone();
        let mut domains = settings.domains.clone();
        stored_domains.sort();
        domains.sort();
        if stored_domains != domains {
            if !only_newer {
                tracing::info!(route = %name, "the stored certificate is for other domains; ordering a new one");
            }
            return Adoption::Nothing;
        }
        let cert = match LoadedCert::from_pem(&stored.chain_pem, &stored.key_pem) {
            Ok(cert) => cert,
            Err(err) => {
                if !only_newer {
                    tracing::warn!(route = %name, error = %err, "the stored certificate cannot be used; ordering a new one");
                }
                return Adoption::Nothing;
            }
        };
        let had = {
            let current = managed.current.lock();
            if only_newer {
                if let Some(current) = current.as_ref() {
                    if current.key.cert.first() == cert.key.cert.first() || cert.not_after < current.not_after {
                        return Adoption::Nothing;
                    }
                }
            }
            current.is_some()
        };
        let source = if stored.meta.source == "custom" { "custom" } else { "acme" };
        let event = only_newer.then_some(if had { CertificateEventKind::Renewed } else { CertificateEventKind::Issued });
        self.install(managed, name, cert, source, event);
        if let Some(redis) = self.shared.get() {
            redis.counters.certificates_loaded.fetch_add(1, Ordering::Relaxed);
            if only_newer {
                tracing::info!(route = %name, "installed the certificate another replica stored");
            }
        }
        Adoption::Adopted
    }

    /// Starts the background work once every listener is up: orders for the routes in `names`
    /// (all when `None`) that have no usable certificate, and the periodic renewal check.
    pub fn start(self: &Arc<Self>, names: Option<&[String]>) {
        let token = {
            let mut running = self.running.lock();
            running.get_or_insert_with(CancellationToken::new).clone()
        };
        if names.is_none() {
            let this = self.clone();
            let cancel = token.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = this.renewal_loop() => {}
                }
            });
            if let Some(redis) = self.shared.get().cloned() {
                let this = self.clone();
                let cancel = token.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = this.follow_replicas(redis) => {}
                    }
                });
            }
        }
        for (name, managed) in self.selected(names) {
            let settings = managed.settings.lock().clone();
            if !settings.custom_provisioning && managed.store_error.lock().is_none() && self.needs_order(&managed, &settings) {
                self.order_in_background(name);
            }
        }
    }

    /// Orders the route's certificate in the background, retrying with backoff until it is
    /// issued or the engine stops (where `certProvisionFunction` declined, the wrapper asks).
    pub fn order_in_background(self: &Arc<Self>, name: String) {
        let Some(cancel) = self.running.lock().clone() else { return };
        let this = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = this.order_until_issued(name) => {}
            }
        });
    }

    /// Cancels the background work (orders in flight are abandoned; their challenges withdrawn).
    pub fn stop(&self) {
        if let Some(token) = self.running.lock().take() {
            token.cancel();
        }
    }

    /// Every automatic certificate's status, by route name.
    pub fn statuses(&self) -> Vec<(String, CertStatus)> {
        let names: Vec<String> = self.managed.lock().keys().cloned().collect();
        names.into_iter().filter_map(|name| Some((name.clone(), self.status(&name)?))).collect()
    }

    pub fn status(&self, name: &str) -> Option<CertStatus> {
        let managed = self.managed.lock().get(name).cloned()?;
        let mut status = managed.status.lock().clone();
        if status.status == "valid" && status.expiry_date.is_some_and(|expiry| expiry <= epoch_ms(SystemTime::now())) {
            status.status = "expired";
        }
        Some(status)
    }

    /// Orders a certificate for the route now (one attempt) and installs it.
    pub async fn order_now(&self, name: &str) -> Result<(), String> {
        let managed = self.managed.lock().get(name).cloned().ok_or_else(|| format!("no route named {name:?} has certificate: 'auto'"))?;
        self.order(name, &managed, true).await
    }

    /// Installs a certificate `certProvisionFunction` gave for one domain of the route.
    pub fn install_custom(&self, name: &str, domain: &str, chain_pem: &str, key_pem: &str) -> Result<(), String> {
        let managed = self.managed.lock().get(name).cloned().ok_or_else(|| format!("no route named {name:?} has certificate: 'auto'"))?;
        let cert = LoadedCert::from_pem(chain_pem, key_pem)?;
        managed.slot.install_for_domain(domain, &cert);
        let mut status = managed.status.lock();
        *status = CertStatus {
            domain: domain.to_string(),
            status: "valid",
            expiry_date: Some(epoch_ms(cert.not_after)),
            issue_date: Some(epoch_ms(cert.not_before)),
            source: "custom",
            error: None,
        };
        drop(status);
        self.event(CertificateEventKind::Issued, name, domain, Some(epoch_ms(cert.not_after)), None);
        Ok(())
    }

    fn selected(&self, names: Option<&[String]>) -> Vec<(String, Arc<Managed>)> {
        let managed = self.managed.lock();
        match names {
            None => managed.iter().map(|(n, m)| (n.clone(), m.clone())).collect(),
            Some(names) => names.iter().filter_map(|n| managed.get(n).map(|m| (n.clone(), m.clone()))).collect(),
        }
    }

    /// No certificate, or one inside the renewal threshold.
    fn needs_order(&self, managed: &Managed, settings: &AcmeSettings) -> bool {
        match managed.current.lock().as_ref() {
            None => managed.slot.is_empty(),
            Some(cert) => cert.remaining(SystemTime::now()) < DAY * settings.renew_threshold_days,
        }
    }

    /// The automatic order of a route: retried with backoff until it succeeds (or stop).
    async fn order_until_issued(&self, name: String) {
        let mut wait = RETRY_FIRST;
        loop {
            let Some(managed) = self.managed.lock().get(&name).cloned() else { return };
            if self.order(&name, &managed, false).await.is_ok() {
                return;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY_MAX);
        }
    }

    /// One order (`forced`: even when the certificate served is not due): with Redis, only while
    /// holding the route's lock, and not at all when another replica's order meanwhile stored what
    /// this one needs, or just failed (then its error is this one's, so that N replicas do not make
    /// N failed orders against the CA's limits).
    async fn order(&self, name: &str, managed: &Arc<Managed>, forced: bool) -> Result<(), String> {
        let _one_at_a_time = managed.ordering.lock().await;
        let Some(redis) = self.shared.get() else { return self.order_alone(name, managed).await };
        if managed.store_error.lock().is_some() {
            // Read again: the value may have been replaced or removed since.
            if let Adoption::Unreadable(err) = self.adopt_stored(name, managed, true).await {
                return Err(err);
            }
        }
        let lock_name = format!("cert:{name}");
        let mut waited = false;
        loop {
            match redis.try_lock(&lock_name, ORDER_LOCK_TTL).await {
                Ok(Some(lock)) => {
                    let result = self.order_holding_lock(name, managed, redis, forced, waited).await;
                    lock.release().await;
                    return result;
                }
                Ok(None) => {
                    if !waited {
                        waited = true;
                        redis.counters.lock_waits.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(route = %name, "another replica is ordering this certificate; waiting for it");
                    }
                    // Until its holder releases it, or dies and it expires.
                    loop {
                        tokio::time::sleep(LOCK_POLL).await;
                        if !matches!(redis.is_locked(&lock_name).await, Ok(true)) {
                            break;
                        }
                    }
                    match self.adopt_stored(name, managed, true).await {
                        Adoption::Adopted => return Ok(()),
                        Adoption::Unreadable(err) => return Err(err),
                        Adoption::Nothing => {}
                    }
                }
                Err(err) => {
                    tracing::warn!(route = %name, error = %err, "redis is unreachable; this replica orders the certificate alone");
                    // The disk cache may hold what is needed (an order done while Redis was away).
                    self.adopt_stored(name, managed, true).await;
                    let settings = managed.settings.lock().clone();
                    if !forced && !self.needs_order(managed, &settings) {
                        return Ok(());
                    }
                    return self.order_alone(name, managed).await;
                }
            }
        }
    }

    async fn order_holding_lock(&self, name: &str, managed: &Arc<Managed>, redis: &SharedRedis, forced: bool, waited: bool) -> Result<(), String> {
        let failed_key = redis.key("cert-failed", name);
        if waited || !forced {
            // An order that finished just before this one took the lock may be what is needed.
            match self.adopt_stored(name, managed, true).await {
                Adoption::Adopted => return Ok(()),
                Adoption::Unreadable(err) => return Err(err),
                Adoption::Nothing => {}
            }
            let settings = managed.settings.lock().clone();
            if !forced && !self.needs_order(managed, &settings) {
                return Ok(());
            }
        }
        if !forced {
            // Another replica's order just failed (this one waited for it, or started meanwhile):
            // its error is this one's until the marker expires.
            let mut get = redis::cmd("GET");
            get.arg(&failed_key);
            if let Ok(Some(err)) = redis.call::<Option<String>>(&get).await {
                let err = format!("another replica's order failed just now: {err}");
                self.report_failure(name, managed, managed.current.lock().is_some(), &err);
                return Err(err);
            }
        }
        redis.counters.orders_placed.fetch_add(1, Ordering::Relaxed);
        let renewal = managed.current.lock().is_some();
        // Bounded: while it runs, every replica waits for this one.
        let result = match tokio::time::timeout(ORDER_TIMEOUT, self.order_alone(name, managed)).await {
            Ok(result) => result,
            Err(_) => {
                let err = format!("the order took longer than {} s and was given up", ORDER_TIMEOUT.as_secs());
                self.report_failure(name, managed, renewal, &err);
                Err(err)
            }
        };
        if let Err(err) = &result {
            let mut set = redis::cmd("SET");
            // Gone a little before this replica's own first retry, which then orders again.
            set.arg(&failed_key).arg(err).arg("PX").arg(FAILURE_SHARED_FOR.as_millis() as u64);
            let _ = redis.call::<()>(&set).await;
        }
        result
    }

    /// One order: on success stored and installed; on failure reported (event and status).
    async fn order_alone(&self, name: &str, managed: &Arc<Managed>) -> Result<(), String> {
        let settings = managed.settings.lock().clone();
        let renewal = managed.current.lock().is_some();
        if !renewal {
            managed.status.lock().status = "pending";
        }
        let store = self.storage(&settings);
        let request = OrderRequest {
            directory_url: &settings.directory_url,
            directory_ca_file: settings.directory_ca_file.as_deref(),
            email: &settings.email,
            domains: &settings.domains,
        };
        let result = async {
            let issued = order::issue(&request, store.as_ref(), &self.challenges).await?;
            let cert = LoadedCert::from_pem(&issued.chain_pem, &issued.key_pem).map_err(|err| format!("the issued certificate: {err}"))?;
            let meta = CertMeta {
                domains: settings.domains.clone(),
                issued_at: epoch_ms(cert.not_before),
                expires_at: epoch_ms(cert.not_after),
                source: "acme".into(),
                directory_url: Some(settings.directory_url.clone()),
            };
            store.save(name, &StoredCert { chain_pem: issued.chain_pem, key_pem: issued.key_pem, meta }).await?;
            Ok::<_, String>(cert)
        }
        .await;
        match result {
            Ok(cert) => {
                let kind = if renewal { CertificateEventKind::Renewed } else { CertificateEventKind::Issued };
                self.install(managed, name, cert, "acme", Some(kind));
                Ok(())
            }
            Err(err) => {
                self.report_failure(name, managed, renewal, &err);
                Err(err)
            }
        }
    }

    fn report_failure(&self, name: &str, managed: &Managed, renewal: bool, err: &str) {
        {
            let mut status = managed.status.lock();
            // A certificate still being served stays valid; the failure is reported.
            if !renewal {
                status.status = "error";
            }
            status.error = Some(err.to_string());
        }
        self.event(CertificateEventKind::Failed, name, &managed.first_domain(), None, Some(err.to_string()));
    }

    fn install(&self, managed: &Managed, name: &str, cert: LoadedCert, source: &'static str, event: Option<CertificateEventKind>) {
        managed.slot.install(&cert);
        let expiry = epoch_ms(cert.not_after);
        *managed.status.lock() = CertStatus {
            domain: managed.first_domain(),
            status: "valid",
            expiry_date: Some(expiry),
            issue_date: Some(epoch_ms(cert.not_before)),
            source,
            error: None,
        };
        *managed.current.lock() = Some(cert);
        if let Some(kind) = event {
            self.event(kind, name, &managed.first_domain(), Some(expiry), None);
        }
    }

    /// Every `renewCheckIntervalHours` (the shortest among the routes): certificates inside their
    /// threshold are reported expiring and, with `autoRenew`, renewed.
    async fn renewal_loop(&self) {
        loop {
            let interval = self
                .selected(None)
                .iter()
                .map(|(_, m)| Duration::from_secs(m.settings.lock().renew_check_interval_secs))
                .min()
                .unwrap_or(DAY)
                .max(MIN_CHECK_INTERVAL);
            tokio::time::sleep(interval).await;
            for (name, managed) in self.selected(None) {
                let settings = managed.settings.lock().clone();
                let remaining = match managed.current.lock().as_ref() {
                    Some(cert) => cert.remaining(SystemTime::now()),
                    None => continue,
                };
                if remaining >= DAY * settings.renew_threshold_days {
                    continue;
                }
                let expiry = managed.status.lock().expiry_date;
                self.event(CertificateEventKind::Expiring, &name, &managed.first_domain(), expiry, None);
                if settings.auto_renew {
                    let _ = self.order(&name, &managed, false).await;
                }
            }
        }
    }

    /// Swaps in the certificates other replicas store: at once for those announced on the
    /// channel, and every `syncIntervalMs` for all (announcements are lost while a subscriber
    /// reconnects).
    async fn follow_replicas(&self, redis: Arc<SharedRedis>) {
        let channel = format!("{}{CERT_CHANNEL}", redis.prefix());
        let mut sync = tokio::time::interval(redis.sync_interval);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let subscribed = match redis.pubsub().await {
                Ok(mut pubsub) => pubsub.subscribe(&channel).await.map(|()| pubsub).map_err(|err| err.to_string()),
                Err(err) => Err(err),
            };
            let mut subscription = match subscribed {
                Ok(pubsub) => Some(pubsub),
                Err(err) => {
                    redis.certificate_outage.failed("new certificates of other replicas are looked for every syncIntervalMs only", &err);
                    None
                }
            };
            let mut messages = subscription.as_mut().map(|pubsub| pubsub.on_message());
            loop {
                let announced = async {
                    match messages.as_mut() {
                        Some(messages) => futures_util::StreamExt::next(messages).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    message = announced => match message {
                        Some(message) => {
                            let Ok(name) = message.get_payload::<String>() else { continue };
                            let managed = self.managed.lock().get(&name).cloned();
                            if let Some(managed) = managed {
                                self.adopt_from_replicas(&name, &managed).await;
                            }
                        }
                        // The subscription broke: subscribe again.
                        None => break,
                    },
                    _ = sync.tick() => {
                        for (name, managed) in self.selected(None) {
                            if managed.settings.lock().custom_provisioning {
                                continue;
                            }
                            self.adopt_from_replicas(&name, &managed).await;
                        }
                        if messages.is_none() {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// A certificate another replica stored, unless this one is ordering (it installs its own
    /// result, or adopts the other's when its wait ends).
    async fn adopt_from_replicas(&self, name: &str, managed: &Managed) {
        if let Ok(_idle) = managed.ordering.try_lock() {
            self.adopt_stored(name, managed, true).await;
        }
    }

    fn event(&self, kind: CertificateEventKind, name: &str, domain: &str, expiry_ms: Option<u64>, error: Option<String>) {
        let expires = expiry_ms.map(|ms| ms / 1000);
        match kind {
            CertificateEventKind::Issued => tracing::info!(route = name, domain, expires, "certificate issued"),
            CertificateEventKind::Renewed => tracing::info!(route = name, domain, expires, "certificate renewed"),
            CertificateEventKind::Expiring => tracing::warn!(route = name, domain, expires, "certificate expires soon"),
            CertificateEventKind::Failed => tracing::warn!(route = name, domain, error = error.as_deref().unwrap_or(""), "certificate order failed"),
        }
        self.scripts.emit(EngineEvent::Certificate { kind, route_name: name.to_string(), domain: domain.to_string(), expiry_ms, error });
    }
}
