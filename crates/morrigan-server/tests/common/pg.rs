//! A PostgreSQL database of the test's own, for tests that run nodes on PostgreSQL.

/// A fresh database, dropped by [`Database::drop_now`] (a test that fails leaves it behind,
/// named `morrigan_<prefix>_<uuid>`).
pub struct Database {
    base: String,
    name: String,
    /// Its `postgres://` URL.
    pub url: String,
}

impl Database {
    /// Creates a database on the server `base` names (`MORRIGAN_TEST_POSTGRES_URL`).
    pub async fn create(base: &str, prefix: &str) -> Database {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(base)
            .await
            .expect("connect to PostgreSQL");
        let name = format!("morrigan_{prefix}_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create database");
        let mut url = url::Url::parse(base).expect("database URL");
        url.set_path(&format!("/{name}"));
        Database {
            base: base.to_string(),
            name,
            url: url.to_string(),
        }
    }

    pub async fn drop_now(self) {
        use sqlx::Connection;
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.base).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut conn)
            .await;
        }
    }
}
