//! The cloud's store through sqlx: a SQLite file by default, PostgreSQL by URL. One set of
//! queries serves both (sqlx's `Any` driver, `$n` placeholders, BIGINT columns); migrations are
//! embedded per backend and applied on connect (under PostgreSQL's advisory lock, so several
//! instances may start at once). Every change that must be atomic is one transaction, and the
//! counters that must only grow are grown in SQL, so instances sharing one database agree.

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, AssertSqlSafe, Row};

use crate::desired::Spec;
use crate::pki::Issued;

#[derive(Debug, thiserror::Error)]
pub enum CloudStoreError {
    #[error(
        "unsupported database URL scheme {0:?}: use sqlite://FILE or postgres://USER@HOST/DATABASE"
    )]
    UnsupportedUrl(String),
    #[error("invalid database URL: {0}")]
    InvalidUrl(sqlx::Error),
    #[error("cannot open the cloud database: {0}")]
    Connect(sqlx::Error),
    #[error("cloud database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cloud database query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
    #[error("no depot named {0:?}")]
    UnknownDepot(String),
    #[error("depot {0:?} is revoked; enrol the machine under a new name")]
    RevokedDepot(String),
    #[error("no fleet rollout {0:?}")]
    UnknownFleetRollout(String),
}

/// Why an enrolment token was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenRefused {
    #[error("unknown enrolment token")]
    Unknown,
    #[error("this enrolment token was already used")]
    Used,
    #[error("this enrolment token has expired; mint a new one")]
    Expired,
    #[error("the depot of this token is revoked")]
    Revoked,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// Rows per multi-row INSERT of events: 5 parameters each, well under SQLite's 32,766 and
/// PostgreSQL's 65,535 bound parameters.
const EVENTS_PER_STATEMENT: usize = 500;

/// A pool of connections to the cloud database; cheap to clone.
#[derive(Clone, Debug)]
pub struct CloudStore {
    pub(crate) pool: AnyPool,
    backend: Backend,
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// A depot as the fleet sees it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DepotRow {
    pub id: String,
    pub name: String,
    pub created_ms: i64,
    pub enrolled_ms: Option<i64>,
    pub revoked_ms: Option<i64>,
    pub last_seen_ms: Option<i64>,
    pub software_version: Option<String>,
    pub desired_revision: i64,
    pub acked_revision: i64,
    pub refused_revision: Option<i64>,
    pub refused_reason: Option<String>,
    pub events_acked: i64,
    pub events_stored: i64,
    pub outbox_dropped_total: i64,
}

/// A stored desired object; `spec` is `None` for a deletion.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DesiredRow {
    pub kind: String,
    pub key: String,
    pub generation: i64,
    pub revision: i64,
    pub spec: Option<Spec>,
    pub updated_ms: i64,
    pub updated_by: String,
}

/// A report from a depot, as received and as stored.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ReportedRow {
    pub kind: String,
    pub key: String,
    pub observed_generation: i64,
    pub observed_ms: i64,
    /// The depot's JSON view, parsed.
    pub json: serde_json::Value,
    pub deleted: bool,
}

/// An event from a depot's outbox.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EventRow {
    pub id: String,
    pub sequence: i64,
    pub at_ms: i64,
    pub kind: String,
    pub json: serde_json::Value,
}

/// An audit record of a change made through the fleet API or CLI.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AuditRow {
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub result: String,
    pub detail: serde_json::Value,
}

const DEPOT_COLUMNS: &str = "d.id, d.name, d.created_ms, d.enrolled_ms, d.revoked_ms, d.last_seen_ms, \
     d.software_version, d.desired_revision, d.acked_revision, d.refused_revision, d.refused_reason, \
     d.events_acked, d.outbox_dropped_total, \
     (SELECT COUNT(*) FROM events e WHERE e.depot_id = d.id) AS events_stored";

fn depot_row(r: &sqlx::any::AnyRow) -> Result<DepotRow, sqlx::Error> {
    Ok(DepotRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        created_ms: r.try_get("created_ms")?,
        enrolled_ms: r.try_get("enrolled_ms")?,
        revoked_ms: r.try_get("revoked_ms")?,
        last_seen_ms: r.try_get("last_seen_ms")?,
        software_version: r.try_get("software_version")?,
        desired_revision: r.try_get("desired_revision")?,
        acked_revision: r.try_get("acked_revision")?,
        refused_revision: r.try_get("refused_revision")?,
        refused_reason: r.try_get("refused_reason")?,
        events_acked: r.try_get("events_acked")?,
        events_stored: r.try_get("events_stored")?,
        outbox_dropped_total: r.try_get("outbox_dropped_total")?,
    })
}

fn desired_row(r: &sqlx::any::AnyRow) -> Result<DesiredRow, CloudStoreError> {
    let deleted: i64 = r.try_get("deleted")?;
    let spec_json: String = r.try_get("spec")?;
    let spec = if deleted != 0 {
        None
    } else {
        Some(
            serde_json::from_str(&spec_json)
                .map_err(|e| CloudStoreError::Corrupt(format!("desired spec: {e}")))?,
        )
    };
    Ok(DesiredRow {
        kind: r.try_get("kind")?,
        key: r.try_get("key")?,
        generation: r.try_get("generation")?,
        revision: r.try_get("revision")?,
        spec,
        updated_ms: r.try_get("updated_ms")?,
        updated_by: r.try_get("updated_by")?,
    })
}

pub(crate) fn json_of(text: &str) -> serde_json::Value {
    // A depot's JSON was checked on the way in; should it not parse, show it as text rather
    // than hide the row.
    serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_owned()))
}

impl CloudStore {
    /// Connects (creating a SQLite file if needed) and migrates to the latest schema.
    pub async fn connect(url: &str) -> Result<Self, CloudStoreError> {
        sqlx::any::install_default_drivers();
        let scheme = url.split(':').next().unwrap_or("");
        let backend = match scheme {
            "sqlite" => Backend::Sqlite,
            "postgres" | "postgresql" => Backend::Postgres,
            other => return Err(CloudStoreError::UnsupportedUrl(other.to_owned())),
        };
        let url = match backend {
            // Create the file on first start; Any passes the URL's options to SQLite.
            Backend::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_owned(),
        };
        let options = AnyConnectOptions::from_str(&url).map_err(CloudStoreError::InvalidUrl)?;
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 8 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // Durable commits, one writer at a time without "database is locked".
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA synchronous = FULL",
                            "PRAGMA foreign_keys = ON",
                            "PRAGMA busy_timeout = 10000",
                        ] {
                            sqlx::query(pragma).execute(&mut *conn).await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(CloudStoreError::Connect)?;
        match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
        }
        Ok(Self { pool, backend })
    }

    /// "sqlite" or "postgres".
    pub fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    /// A real round trip; returns the newest applied migration version.
    pub async fn ping(&self) -> Result<i64, CloudStoreError> {
        let version: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(MAX(version), 0) AS BIGINT) FROM _sqlx_migrations WHERE success",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(version)
    }

    /// Waits for in-use connections and closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The fleet CA's (certificate, key) PEM; the first instance to ask creates it with
    /// `generate`, every later one, on this database, gets the same.
    pub async fn ca_or_create<E>(
        &self,
        now_ms: i64,
        generate: impl FnOnce() -> Result<(String, String), E>,
    ) -> Result<Result<(String, String), E>, CloudStoreError> {
        if let Some(found) = self.ca().await? {
            return Ok(Ok(found));
        }
        let (cert, key) = match generate() {
            Ok(pair) => pair,
            Err(e) => return Ok(Err(e)),
        };
        sqlx::query(
            "INSERT INTO ca (id, cert_pem, key_pem, created_ms) VALUES (1, $1, $2, $3) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&cert)
        .bind(&key)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        // Another instance may have won the race: everyone uses the stored one.
        let stored = self
            .ca()
            .await?
            .ok_or_else(|| CloudStoreError::Corrupt("the CA row vanished".into()))?;
        Ok(Ok(stored))
    }

    async fn ca(&self) -> Result<Option<(String, String)>, CloudStoreError> {
        let row = sqlx::query("SELECT cert_pem, key_pem FROM ca WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Some((r.try_get("cert_pem")?, r.try_get("key_pem")?)),
            None => None,
        })
    }

    /// Registers a depot by name if new and stores a one-time token for it.
    pub async fn mint_enroll_token(
        &self,
        depot_name: &str,
        token_hash: &str,
        now_ms: i64,
        expires_ms: i64,
        actor: &str,
    ) -> Result<DepotRow, CloudStoreError> {
        let mut tx = self.pool.begin().await?;
        let new_id = hex::encode(rand::random::<[u8; 8]>());
        sqlx::query(
            "INSERT INTO depots (id, name, created_ms) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&new_id)
        .bind(depot_name)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEPOT_COLUMNS} FROM depots d WHERE d.name = $1"
        )))
        .bind(depot_name)
        .fetch_one(&mut *tx)
        .await?;
        let depot = depot_row(&row)?;
        if depot.revoked_ms.is_some() {
            return Err(CloudStoreError::RevokedDepot(depot_name.to_owned()));
        }
        sqlx::query(
            "INSERT INTO enroll_tokens (token_hash, depot_id, created_ms, expires_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(token_hash)
        .bind(&depot.id)
        .bind(now_ms)
        .bind(expires_ms)
        .execute(&mut *tx)
        .await?;
        audit_in(
            &mut tx,
            now_ms,
            actor,
            "depot.enroll_token",
            Some(depot_name),
            "ok",
            &serde_json::json!({ "expires_ms": expires_ms }),
        )
        .await?;
        tx.commit().await?;
        Ok(depot)
    }

    /// Consumes a token: exactly one caller succeeds, however many instances race.
    pub async fn consume_enroll_token(
        &self,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<Result<DepotRow, TokenRefused>, CloudStoreError> {
        let used = sqlx::query(
            "UPDATE enroll_tokens SET used_ms = $1 \
             WHERE token_hash = $2 AND used_ms IS NULL AND expires_ms > $1 RETURNING depot_id",
        )
        .bind(now_ms)
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some(used) = used else {
            let found = sqlx::query("SELECT used_ms FROM enroll_tokens WHERE token_hash = $1")
                .bind(token_hash)
                .fetch_optional(&self.pool)
                .await?;
            return Ok(Err(match found {
                None => TokenRefused::Unknown,
                Some(r) if r.try_get::<Option<i64>, _>("used_ms")?.is_some() => TokenRefused::Used,
                Some(_) => TokenRefused::Expired,
            }));
        };
        let depot_id: String = used.try_get("depot_id")?;
        let depot = self.depot_by_id(&depot_id).await?;
        if depot.revoked_ms.is_some() {
            return Ok(Err(TokenRefused::Revoked));
        }
        Ok(Ok(depot))
    }

    /// Records a certificate issued to a depot. On enrolment (`supersede`) every earlier
    /// certificate of the depot is revoked: the machine that held them was re-flashed or lost.
    pub async fn record_cert(
        &self,
        depot_id: &str,
        issued: &Issued,
        now_ms: i64,
        supersede: bool,
        version: &str,
    ) -> Result<(), CloudStoreError> {
        let mut tx = self.pool.begin().await?;
        if supersede {
            sqlx::query(
                "UPDATE depot_certs SET revoked_ms = $1 WHERE depot_id = $2 AND revoked_ms IS NULL",
            )
            .bind(now_ms)
            .bind(depot_id)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE depots SET enrolled_ms = $1, software_version = $2 WHERE id = $3")
                .bind(now_ms)
                .bind(version)
                .bind(depot_id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "INSERT INTO depot_certs (serial, depot_id, issued_ms, not_after_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(&issued.serial)
        .bind(depot_id)
        .bind(now_ms)
        .bind(issued.not_after_ms)
        .execute(&mut *tx)
        .await?;
        let action = if supersede {
            "depot.enrolled"
        } else {
            "depot.renewed"
        };
        audit_in(
            &mut tx,
            now_ms,
            &format!("depot:{depot_id}"),
            action,
            Some(depot_id),
            "ok",
            &serde_json::json!({ "serial": issued.serial, "not_after_ms": issued.not_after_ms }),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The depot behind a client certificate, if it may talk: the depot is not revoked and
    /// the certificate is one the cloud issued and has not revoked.
    pub async fn authorise_cert(
        &self,
        depot_id: &str,
        serial: &str,
    ) -> Result<Result<DepotRow, String>, CloudStoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEPOT_COLUMNS}, c.revoked_ms AS cert_revoked_ms FROM depots d \
             JOIN depot_certs c ON c.depot_id = d.id WHERE d.id = $1 AND c.serial = $2"
        )))
        .bind(depot_id)
        .bind(serial)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(Err("the certificate was not issued to this depot".into()));
        };
        let depot = depot_row(&row)?;
        if depot.revoked_ms.is_some() {
            return Ok(Err(format!("depot {} is revoked", depot.name)));
        }
        if row.try_get::<Option<i64>, _>("cert_revoked_ms")?.is_some() {
            return Ok(Err(
                "this certificate was superseded by a later enrolment".into()
            ));
        }
        Ok(Ok(depot))
    }

    /// Revokes a depot: its certificates stop working on the next call or session.
    pub async fn revoke_depot(
        &self,
        name: &str,
        now_ms: i64,
        actor: &str,
    ) -> Result<DepotRow, CloudStoreError> {
        let mut tx = self.pool.begin().await?;
        let done =
            sqlx::query("UPDATE depots SET revoked_ms = $1 WHERE name = $2 AND revoked_ms IS NULL")
                .bind(now_ms)
                .bind(name)
                .execute(&mut *tx)
                .await?;
        if done.rows_affected() == 0 {
            let exists = sqlx::query("SELECT id FROM depots WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(CloudStoreError::UnknownDepot(name.to_owned()));
            }
        }
        sqlx::query(
            "UPDATE depot_certs SET revoked_ms = $1 WHERE revoked_ms IS NULL \
             AND depot_id = (SELECT id FROM depots WHERE name = $2)",
        )
        .bind(now_ms)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        audit_in(
            &mut tx,
            now_ms,
            actor,
            "depot.revoke",
            Some(name),
            "ok",
            &serde_json::json!({}),
        )
        .await?;
        tx.commit().await?;
        self.depot(name).await
    }

    /// Starts a session: records the depot's hello and returns (events acknowledged, the
    /// current desired revision). Should the depot hold a newer revision than the cloud (a
    /// restored cloud database), the cloud's counter jumps past it, so its next change is
    /// newer than anything the depot has.
    pub async fn session_hello(
        &self,
        depot_id: &str,
        depot_revision: u64,
        software_version: &str,
        dropped_total: u64,
        now_ms: i64,
    ) -> Result<(i64, i64), CloudStoreError> {
        let row = sqlx::query(
            "UPDATE depots SET last_seen_ms = $1, software_version = $2, \
             outbox_dropped_total = $3, \
             desired_revision = CASE WHEN desired_revision < $4 THEN $4 ELSE desired_revision END, \
             acked_revision = CASE WHEN acked_revision < $4 THEN $4 ELSE acked_revision END \
             WHERE id = $5 RETURNING events_acked, desired_revision",
        )
        .bind(now_ms)
        .bind(software_version)
        .bind(clamp(dropped_total))
        .bind(clamp(depot_revision))
        .bind(depot_id)
        .fetch_one(&self.pool)
        .await?;
        Ok((
            row.try_get("events_acked")?,
            row.try_get("desired_revision")?,
        ))
    }

    pub async fn touch(&self, depot_id: &str, now_ms: i64) -> Result<(), CloudStoreError> {
        sqlx::query("UPDATE depots SET last_seen_ms = $1 WHERE id = $2")
            .bind(now_ms)
            .bind(depot_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The depot's current desired revision (polled by sessions, so a change made through any
    /// instance reaches the depot whichever instance holds its session).
    pub async fn desired_revision(&self, depot_id: &str) -> Result<i64, CloudStoreError> {
        Ok(
            sqlx::query_scalar("SELECT desired_revision FROM depots WHERE id = $1")
                .bind(depot_id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Desired objects changed after `after` (tombstones included), oldest change first.
    pub async fn desired_since(
        &self,
        depot_id: &str,
        after: i64,
    ) -> Result<Vec<DesiredRow>, CloudStoreError> {
        let rows = sqlx::query(
            "SELECT kind, key, generation, revision, deleted, spec, updated_ms, updated_by \
             FROM desired WHERE depot_id = $1 AND revision > $2 ORDER BY revision, kind, key",
        )
        .bind(depot_id)
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(desired_row).collect()
    }

    /// Sets (`Some`) or removes (`None`) a desired object of a depot; returns the new
    /// revision and the object's generation. Audited in the same transaction.
    pub async fn set_desired(
        &self,
        depot_name: &str,
        kind: &str,
        key: &str,
        spec: Option<&Spec>,
        actor: &str,
        now_ms: i64,
    ) -> Result<(i64, i64), CloudStoreError> {
        let mut tx = self.pool.begin().await?;
        let bumped = sqlx::query(
            "UPDATE depots SET desired_revision = desired_revision + 1 \
             WHERE name = $1 AND revoked_ms IS NULL RETURNING id, desired_revision",
        )
        .bind(depot_name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(bumped) = bumped else {
            let revoked = sqlx::query("SELECT id FROM depots WHERE name = $1")
                .bind(depot_name)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            return Err(if revoked {
                CloudStoreError::RevokedDepot(depot_name.to_owned())
            } else {
                CloudStoreError::UnknownDepot(depot_name.to_owned())
            });
        };
        let depot_id: String = bumped.try_get("id")?;
        let revision: i64 = bumped.try_get("desired_revision")?;
        let spec_json = match spec {
            Some(s) => serde_json::to_string(s).expect("a spec serialises"),
            None => "null".to_owned(),
        };
        let generation: i64 = sqlx::query_scalar(
            "INSERT INTO desired (depot_id, kind, key, generation, revision, deleted, spec, updated_ms, updated_by) \
             VALUES ($1, $2, $3, 1, $4, $5, $6, $7, $8) \
             ON CONFLICT (depot_id, kind, key) DO UPDATE SET generation = desired.generation + 1, \
             revision = excluded.revision, deleted = excluded.deleted, spec = excluded.spec, \
             updated_ms = excluded.updated_ms, updated_by = excluded.updated_by \
             RETURNING generation",
        )
        .bind(&depot_id)
        .bind(kind)
        .bind(key)
        .bind(revision)
        .bind(i64::from(spec.is_none()))
        .bind(&spec_json)
        .bind(now_ms)
        .bind(actor)
        .fetch_one(&mut *tx)
        .await?;
        let action = if spec.is_some() {
            "desired.set"
        } else {
            "desired.remove"
        };
        audit_in(
            &mut tx,
            now_ms,
            actor,
            action,
            Some(&format!("{depot_name}/{kind}/{key}")),
            "ok",
            &serde_json::json!({ "revision": revision, "generation": generation, "spec": spec }),
        )
        .await?;
        tx.commit().await?;
        Ok((revision, generation))
    }

    pub async fn desired_acked(
        &self,
        depot_id: &str,
        revision: u64,
    ) -> Result<(), CloudStoreError> {
        sqlx::query(
            "UPDATE depots SET acked_revision = CASE WHEN acked_revision < $1 THEN $1 ELSE acked_revision END, \
             refused_revision = NULL, refused_reason = NULL WHERE id = $2",
        )
        .bind(clamp(revision))
        .bind(depot_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn desired_refused(
        &self,
        depot_id: &str,
        revision: u64,
        reason: &str,
    ) -> Result<(), CloudStoreError> {
        sqlx::query("UPDATE depots SET refused_revision = $1, refused_reason = $2 WHERE id = $3")
            .bind(clamp(revision))
            .bind(reason)
            .bind(depot_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Stores events (an id seen before is ignored) and returns the sequence every event up
    /// to which is now stored.
    pub async fn store_events(
        &self,
        depot_id: &str,
        events: &[EventRow],
        now_ms: i64,
    ) -> Result<i64, CloudStoreError> {
        let mut tx = self.pool.begin().await?;
        // One multi-row statement per slice of the batch, not a round trip per event: the
        // cloud's time (and the database's) goes to statements, not rows.
        for slice in events.chunks(EVENTS_PER_STATEMENT) {
            let mut sql = String::from(
                "INSERT INTO events (depot_id, received_ms, event_id, sequence, at_ms, kind, json) VALUES ",
            );
            for i in 0..slice.len() {
                let p = 3 + i * 5;
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!(
                    "($1, $2, ${}, ${}, ${}, ${}, ${})",
                    p,
                    p + 1,
                    p + 2,
                    p + 3,
                    p + 4
                ));
            }
            sql.push_str(" ON CONFLICT (depot_id, event_id) DO NOTHING");
            let mut query = sqlx::query(AssertSqlSafe(sql))
                .persistent(false)
                .bind(depot_id)
                .bind(now_ms);
            for e in slice {
                query = query
                    .bind(&e.id)
                    .bind(e.sequence)
                    .bind(e.at_ms)
                    .bind(&e.kind)
                    .bind(e.json.to_string());
            }
            query.execute(&mut *tx).await?;
        }
        let newest = events.iter().map(|e| e.sequence).max().unwrap_or(0);
        let acked: i64 = sqlx::query_scalar(
            "UPDATE depots SET last_seen_ms = $1, \
             events_acked = CASE WHEN events_acked < $2 THEN $2 ELSE events_acked END \
             WHERE id = $3 RETURNING events_acked",
        )
        .bind(now_ms)
        .bind(newest)
        .bind(depot_id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(acked)
    }

    /// Stores reports; an older observation never replaces a newer one.
    pub async fn store_reported(
        &self,
        depot_id: &str,
        objects: &[ReportedRow],
        now_ms: i64,
    ) -> Result<(), CloudStoreError> {
        let mut tx = self.pool.begin().await?;
        for o in objects {
            sqlx::query(
                "INSERT INTO reported (depot_id, kind, key, observed_generation, observed_ms, json, deleted, received_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (depot_id, kind, key) DO UPDATE SET \
                 observed_generation = excluded.observed_generation, observed_ms = excluded.observed_ms, \
                 json = excluded.json, deleted = excluded.deleted, received_ms = excluded.received_ms \
                 WHERE reported.observed_ms <= excluded.observed_ms",
            )
            .bind(depot_id)
            .bind(&o.kind)
            .bind(&o.key)
            .bind(o.observed_generation)
            .bind(o.observed_ms)
            .bind(o.json.to_string())
            .bind(i64::from(o.deleted))
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("UPDATE depots SET last_seen_ms = $1 WHERE id = $2")
            .bind(now_ms)
            .bind(depot_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn depots(&self) -> Result<Vec<DepotRow>, CloudStoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEPOT_COLUMNS} FROM depots d ORDER BY d.name"
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(depot_row).collect::<Result<_, _>>()?)
    }

    pub async fn depot(&self, name: &str) -> Result<DepotRow, CloudStoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEPOT_COLUMNS} FROM depots d WHERE d.name = $1"
        )))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| CloudStoreError::UnknownDepot(name.to_owned()))?;
        Ok(depot_row(&row)?)
    }

    async fn depot_by_id(&self, id: &str) -> Result<DepotRow, CloudStoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEPOT_COLUMNS} FROM depots d WHERE d.id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| CloudStoreError::UnknownDepot(id.to_owned()))?;
        Ok(depot_row(&row)?)
    }

    /// The current (not deleted) desired objects of a depot.
    pub async fn desired_of(&self, depot_id: &str) -> Result<Vec<DesiredRow>, CloudStoreError> {
        let rows = sqlx::query(
            "SELECT kind, key, generation, revision, deleted, spec, updated_ms, updated_by \
             FROM desired WHERE depot_id = $1 AND deleted = 0 ORDER BY kind, key",
        )
        .bind(depot_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(desired_row).collect()
    }

    pub async fn reported_of(&self, depot_id: &str) -> Result<Vec<ReportedRow>, CloudStoreError> {
        let rows = sqlx::query(
            "SELECT kind, key, observed_generation, observed_ms, json, deleted FROM reported \
             WHERE depot_id = $1 AND deleted = 0 ORDER BY kind, key",
        )
        .bind(depot_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ReportedRow {
                    kind: r.try_get("kind")?,
                    key: r.try_get("key")?,
                    observed_generation: r.try_get("observed_generation")?,
                    observed_ms: r.try_get("observed_ms")?,
                    json: json_of(&r.try_get::<String, _>("json")?),
                    deleted: false,
                })
            })
            .collect()
    }

    /// Events of a depot after a sequence, oldest first.
    pub async fn events_of(
        &self,
        depot_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<EventRow>, CloudStoreError> {
        let rows = sqlx::query(
            "SELECT event_id, sequence, at_ms, kind, json FROM events \
             WHERE depot_id = $1 AND sequence > $2 ORDER BY sequence LIMIT $3",
        )
        .bind(depot_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(EventRow {
                    id: r.try_get("event_id")?,
                    sequence: r.try_get("sequence")?,
                    at_ms: r.try_get("at_ms")?,
                    kind: r.try_get("kind")?,
                    json: json_of(&r.try_get::<String, _>("json")?),
                })
            })
            .collect()
    }

    /// Stores a fleet API token (its SHA-256) with a role.
    pub async fn create_api_token(
        &self,
        token_hash: &str,
        name: &str,
        role: &str,
        now_ms: i64,
        actor: &str,
    ) -> Result<(), CloudStoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO api_tokens (token_hash, name, role, created_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(token_hash)
        .bind(name)
        .bind(role)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        audit_in(
            &mut tx,
            now_ms,
            actor,
            "token.create",
            Some(name),
            "ok",
            &serde_json::json!({ "role": role }),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The (name, role) of a live API token.
    pub async fn api_token(
        &self,
        token_hash: &str,
    ) -> Result<Option<(String, String)>, CloudStoreError> {
        let row = sqlx::query(
            "SELECT name, role FROM api_tokens WHERE token_hash = $1 AND revoked_ms IS NULL",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => Some((r.try_get("name")?, r.try_get("role")?)),
            None => None,
        })
    }

    pub async fn audit(
        &self,
        now_ms: i64,
        actor: &str,
        action: &str,
        target: Option<&str>,
        result: &str,
        detail: &serde_json::Value,
    ) -> Result<(), CloudStoreError> {
        let mut tx = self.pool.begin().await?;
        audit_in(&mut tx, now_ms, actor, action, target, result, detail).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The newest audit records first.
    pub async fn audit_log(&self, limit: i64) -> Result<Vec<AuditRow>, CloudStoreError> {
        let rows = sqlx::query(
            "SELECT at_ms, actor, action, target, result, detail FROM audit_log ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditRow {
                    at_ms: r.try_get("at_ms")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    result: r.try_get("result")?,
                    detail: json_of(&r.try_get::<String, _>("detail")?),
                })
            })
            .collect()
    }
}

pub(crate) async fn audit_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    now_ms: i64,
    actor: &str,
    action: &str,
    target: Option<&str>,
    result: &str,
    detail: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_log (at_ms, actor, action, target, result, detail) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(now_ms)
    .bind(actor)
    .bind(action)
    .bind(target)
    .bind(result)
    .bind(detail.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Wire counters are u64, the database's BIGINT is signed; nothing real reaches 2^63.
fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, CloudStore) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("cloud.db").display());
        let store = CloudStore::connect(&url).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn connects_migrates_and_pings() {
        let (dir, store) = store().await;
        assert_eq!(store.ping().await.unwrap(), 3);
        store.close().await;
        let url = format!("sqlite://{}", dir.path().join("cloud.db").display());
        let again = CloudStore::connect(&url).await.unwrap();
        assert_eq!(again.ping().await.unwrap(), 3);
    }

    #[tokio::test]
    async fn rejects_unknown_schemes() {
        let err = CloudStore::connect("mysql://x").await.unwrap_err();
        assert!(matches!(err, CloudStoreError::UnsupportedUrl(_)), "{err}");
    }

    #[tokio::test]
    async fn a_token_is_consumed_once_and_desired_revisions_only_grow() {
        let (_dir, store) = store().await;
        let depot = store
            .mint_enroll_token("north", "h1", 1_000, 2_000, "cli")
            .await
            .unwrap();
        assert_eq!(
            store.consume_enroll_token("h1", 1_500).await.unwrap(),
            Ok(depot.clone())
        );
        assert_eq!(
            store.consume_enroll_token("h1", 1_501).await.unwrap(),
            Err(TokenRefused::Used)
        );
        assert_eq!(
            store.consume_enroll_token("zz", 1_501).await.unwrap(),
            Err(TokenRefused::Unknown)
        );
        store
            .mint_enroll_token("north", "h2", 1_000, 2_000, "cli")
            .await
            .unwrap();
        assert_eq!(
            store.consume_enroll_token("h2", 2_000).await.unwrap(),
            Err(TokenRefused::Expired)
        );

        let spec = Spec::SiteLimit { limit_kw: 90.0 };
        assert_eq!(
            store
                .set_desired("north", "site_limit", "site", Some(&spec), "t", 1)
                .await
                .unwrap(),
            (1, 1)
        );
        assert_eq!(
            store
                .set_desired("north", "site_limit", "site", None, "t", 2)
                .await
                .unwrap(),
            (2, 2)
        );
        let since = store.desired_since(&depot.id, 1).await.unwrap();
        assert_eq!(since.len(), 1);
        assert_eq!(since[0].spec, None);
        // A depot that holds revision 7 (the cloud was restored from a backup) moves the
        // counter past it.
        let (_, revision) = store.session_hello(&depot.id, 7, "v", 0, 3).await.unwrap();
        assert_eq!(revision, 7);
        assert_eq!(
            store
                .set_desired(
                    "north",
                    "tariff",
                    "site",
                    Some(&Spec::Tariff {
                        prices_per_kwh: vec![0.1; 96]
                    }),
                    "t",
                    4
                )
                .await
                .unwrap()
                .0,
            8
        );
        assert!(matches!(
            store
                .set_desired("south", "tariff", "site", None, "t", 4)
                .await,
            Err(CloudStoreError::UnknownDepot(_))
        ));
    }

    #[tokio::test]
    async fn events_are_stored_once_and_reports_never_go_back_in_time() {
        let (_dir, store) = store().await;
        let depot = store
            .mint_enroll_token("north", "h", 0, 10, "cli")
            .await
            .unwrap();
        let event = |seq: i64| EventRow {
            id: format!("e{seq}"),
            sequence: seq,
            at_ms: seq,
            kind: "audit".into(),
            json: serde_json::json!({ "n": seq }),
        };
        let batch: Vec<_> = (1..=3).map(event).collect();
        assert_eq!(store.store_events(&depot.id, &batch, 5).await.unwrap(), 3);
        // Redelivered after a lost acknowledgement: nothing doubles.
        assert_eq!(
            store.store_events(&depot.id, &batch[1..], 6).await.unwrap(),
            3
        );
        assert_eq!(store.events_of(&depot.id, 0, 100).await.unwrap().len(), 3);

        let report = |at: i64, v: i64| ReportedRow {
            kind: "vehicle".into(),
            key: "v1".into(),
            observed_generation: 0,
            observed_ms: at,
            json: serde_json::json!({ "soc": v }),
            deleted: false,
        };
        store
            .store_reported(&depot.id, &[report(10, 50)], 1)
            .await
            .unwrap();
        store
            .store_reported(&depot.id, &[report(9, 40)], 2)
            .await
            .unwrap();
        let got = store.reported_of(&depot.id).await.unwrap();
        assert_eq!(got[0].json, serde_json::json!({ "soc": 50 }));
    }
}
