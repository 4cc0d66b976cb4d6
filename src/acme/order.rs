//! One RFC 8555 exchange through instant-acme: the account (created once per directory and
//! email, its credentials kept in the store) and an HTTP-01 order for a set of names, whose
//! challenge answers are published in the `ChallengeStore` only while the order needs them.

use std::sync::Arc;
use std::time::Duration;

use instant_acme::{Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy};

use super::challenge::ChallengeStore;
use super::store::CertStorage;

/// Validation by the server (it fetches our challenge answers) and issuance may take this long.
const VALIDATION_WAIT: Duration = Duration::from_secs(90);
const ISSUANCE_WAIT: Duration = Duration::from_secs(60);

/// What the ACME server and the order need from the settings.
pub struct OrderRequest<'a> {
    pub directory_url: &'a str,
    pub directory_ca_file: Option<&'a str>,
    pub email: &'a str,
    pub domains: &'a [String],
}

/// The issued chain (leaf first) and its freshly generated private key, PEM.
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
}

pub async fn issue(request: &OrderRequest<'_>, store: &dyn CertStorage, challenges: &Arc<ChallengeStore>) -> Result<Issued, String> {
    let account = account(request, store).await?;
    let identifiers: Vec<Identifier> = request.domains.iter().map(|d| Identifier::Dns(d.clone())).collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await.map_err(|e| describe("new order", &e))?;

    // Published until this function returns, whatever happens on the way.
    let mut published = Published { store: challenges.clone(), tokens: Vec::new() };
    let mut authorizations = order.authorizations();
    while let Some(result) = authorizations.next().await {
        let mut authorization = result.map_err(|e| describe("authorization", &e))?;
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => return Err(format!("authorization for {} is {other:?}", authorization.identifier())),
        }
        let name = authorization.identifier().to_string();
        let mut challenge = authorization
            .challenge(ChallengeType::Http01)
            .ok_or_else(|| format!("the ACME server offers no http-01 challenge for {name}"))?;
        let key_authorization = challenge.key_authorization();
        published.tokens.push(challenge.token.clone());
        challenges.publish(&challenge.token, key_authorization.as_str()).await;
        challenge.set_ready().await.map_err(|e| describe("challenge", &e))?;
    }

    let retry = RetryPolicy::new().initial_delay(Duration::from_millis(250)).backoff(1.5).timeout(VALIDATION_WAIT);
    let status = order.poll_ready(&retry).await.map_err(|e| describe("validation", &e))?;
    if status != OrderStatus::Ready {
        let reason = invalid_reason(&mut order).await;
        return Err(format!("the order is {status:?}: {reason}"));
    }
    drop(published);
    let key_pem = order.finalize().await.map_err(|e| describe("finalize", &e))?;
    let retry = RetryPolicy::new().initial_delay(Duration::from_millis(250)).backoff(1.5).timeout(ISSUANCE_WAIT);
    let chain_pem = order.poll_certificate(&retry).await.map_err(|e| describe("certificate download", &e))?;
    Ok(Issued { chain_pem, key_pem })
}

/// The account for this directory and email: restored from the store, else created and stored.
async fn account(request: &OrderRequest<'_>, store: &dyn CertStorage) -> Result<Account, String> {
    let builder = || match request.directory_ca_file {
        Some(path) => Account::builder_with_root(path).map_err(|e| format!("directoryCaFile {path}: {}", chain(&e))),
        None => Account::builder().map_err(|e| describe("HTTP client", &e)),
    };
    // Orders of several routes start together on a fresh store: one registers the account, the
    // others wait and restore it, so one directory and email make one account.
    static CREATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _creating = CREATING.lock().await;
    if let Some(json) = store.load_account(request.directory_url, request.email).await? {
        match serde_json::from_str::<AccountCredentials>(&json) {
            Ok(credentials) => return builder()?.from_credentials(credentials).await.map_err(|e| describe("account", &e)),
            Err(err) => tracing::warn!(error = %err, "stored ACME account credentials are unreadable; creating a new account"),
        }
    }
    let contact = format!("mailto:{}", request.email);
    let new_account = NewAccount { contact: &[&contact], terms_of_service_agreed: true, only_return_existing: false };
    let (account, credentials) = builder()?
        .create(&new_account, request.directory_url.to_string(), None)
        .await
        .map_err(|e| describe(&format!("account at {}", request.directory_url), &e))?;
    let json = serde_json::to_string(&credentials).map_err(|e| e.to_string())?;
    store.save_account(request.directory_url, request.email, &json).await?;
    Ok(account)
}

/// Why an order ended invalid: the first failed challenge's problem, else the order's own.
async fn invalid_reason(order: &mut instant_acme::Order) -> String {
    let mut authorizations = order.authorizations();
    while let Some(Ok(authorization)) = authorizations.next().await {
        if let Some(problem) = authorization.challenges.iter().find_map(|c| c.error.as_ref()) {
            return format!("{}: {problem}", authorization.identifier());
        }
    }
    drop(authorizations);
    match &order.state().error {
        Some(problem) => problem.to_string(),
        None => "no reason given by the server".to_string(),
    }
}

/// Takes the challenge answers down again.
struct Published {
    store: Arc<ChallengeStore>,
    tokens: Vec<String>,
}

impl Drop for Published {
    fn drop(&mut self) {
        for token in &self.tokens {
            self.store.withdraw(token);
        }
    }
}

fn describe(step: &str, err: &instant_acme::Error) -> String {
    format!("{step}: {}", chain(err))
}

/// An error with its causes ("connect error: Connection refused"), which hyper keeps apart.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
