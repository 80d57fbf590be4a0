//! `eventfold keys create|list|revoke`: the API keys of a database,
//! printed; the work is `eventfold_platform::auth::keys`'s.

use std::time::SystemTime;

use clap::Subcommand;
use eventfold_platform::auth::keys::{ApiKey, ApiKeyStore};
use eventfold_store::Database;

#[derive(Debug, Subcommand)]
pub(crate) enum KeysAction {
    /// Create a key; the key is printed this once (only its hash is kept).
    Create {
        /// What the key is for, e.g. billing-sync.
        #[arg(long)]
        name: String,
        /// A role the key grants, e.g. orders.write (repeat for more).
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
    },
    /// Every key, revoked ones included: id, prefix, name, roles, times.
    List,
    /// Revoke a key: every process refuses it within a second.
    Revoke {
        /// The key's id (see `eventfold keys list`).
        id: String,
    },
}

/// Keys read per query by `list`.
const LIST_PAGE: i64 = 500;

fn time(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn optional_time(t: Option<SystemTime>) -> String {
    t.map_or_else(|| "-".to_owned(), time)
}

/// Runs `action` on the API keys kept in `database`.
pub(crate) async fn run(database: &Database, action: KeysAction) -> anyhow::Result<()> {
    let store = ApiKeyStore::new(database.clone());
    match action {
        KeysAction::Create { name, roles } => {
            let created = store.create(&name, &roles).await?;
            let key = &created.api_key;
            println!("id:    {}", key.id);
            println!("name:  {}", key.name);
            println!("roles: {}", key.roles.join(","));
            println!("key:   {}", created.key.expose());
            eprintln!(
                "eventfold: the key is shown this once (only its hash is kept): send it as `x-api-key: KEY`; \
                 its calls act as {}",
                key.subject()
            );
        }
        KeysAction::List => {
            println!(
                "{:<36} {:<12} {:<20} {:<20} {:<20} {:<20} roles",
                "id", "prefix", "name", "created", "last used", "revoked"
            );
            let mut after = None;
            loop {
                let page = store.list(after, LIST_PAGE).await?;
                for key in &page {
                    print_row(key);
                }
                match page.last() {
                    Some(last) if i64::try_from(page.len()).is_ok_and(|n| n >= LIST_PAGE) => {
                        after = Some((last.create_time, last.id));
                    }
                    _ => break,
                }
            }
        }
        KeysAction::Revoke { id } => {
            let key = store.revoke(&id).await?;
            println!("{} ({}) revoked at {}", key.id, key.name, optional_time(key.revoke_time));
        }
    }
    Ok(())
}

fn print_row(key: &ApiKey) {
    println!(
        "{:<36} {:<12} {:<20} {:<20} {:<20} {:<20} {}",
        key.id,
        key.prefix,
        key.name,
        time(key.create_time),
        optional_time(key.last_use_time),
        optional_time(key.revoke_time),
        key.roles.join(",")
    );
}
