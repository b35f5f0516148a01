//! The cloud's store through sqlx: a SQLite file by default. Migrations are embedded in the
//! binary and applied on connect.

use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

#[derive(Debug, thiserror::Error)]
pub enum CloudStoreError {
    #[error(
        "unsupported database URL scheme in {0:?}: this build supports sqlite:// (PostgreSQL arrives with federation)"
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
}

/// A pool of connections to the cloud database; cheap to clone.
#[derive(Clone, Debug)]
pub struct CloudStore {
    pool: SqlitePool,
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

impl CloudStore {
    /// Connects (creating a SQLite file if needed) and migrates to the latest schema.
    pub async fn connect(url: &str) -> Result<Self, CloudStoreError> {
        if !url.starts_with("sqlite:") {
            return Err(CloudStoreError::UnsupportedUrl(
                url.split(':').next().unwrap_or("").to_owned(),
            ));
        }
        let options = SqliteConnectOptions::from_str(url)
            .map_err(CloudStoreError::InvalidUrl)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .map_err(CloudStoreError::Connect)?;
        SQLITE_MIGRATIONS.run(&pool).await?;
        Ok(Self { pool })
    }

    /// A real round trip; returns the newest applied migration version.
    pub async fn ping(&self) -> Result<i64, CloudStoreError> {
        let version: i64 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(version)
    }

    /// Waits for in-use connections and closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_migrates_and_pings() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("cloud.db").display());
        let store = CloudStore::connect(&url).await.unwrap();
        assert_eq!(store.ping().await.unwrap(), 1);
        store.close().await;
        // Reconnecting applies nothing new and keeps the version.
        let again = CloudStore::connect(&url).await.unwrap();
        assert_eq!(again.ping().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn rejects_unknown_schemes() {
        let err = CloudStore::connect("mysql://x").await.unwrap_err();
        assert!(matches!(err, CloudStoreError::UnsupportedUrl(_)), "{err}");
    }
}
