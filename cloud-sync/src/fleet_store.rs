//! Fleet rollouts in the cloud store: the machine as JSON with a revision that every stored
//! step names (compare and set), so cloud instances sharing one PostgreSQL can all drive
//! rollouts and a step computed from a stale read is dropped, not stored over a newer one.

use sqlx::Row;

use crate::store::{CloudStore, CloudStoreError, audit_in, json_of};

/// A fleet rollout as stored.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FleetRolloutRow {
    pub id: String,
    pub hardware_id: String,
    pub version: String,
    pub status: String,
    /// The fleet machine (JSON text; the appliance owns its type).
    pub machine: String,
    /// Each depot's own plan for its vehicles.
    pub depot_plan: serde_json::Value,
    pub revision: i64,
    pub created_ms: i64,
    pub created_by: String,
    pub updated_ms: i64,
}

/// One stored step.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FleetLogRow {
    pub at_ms: i64,
    pub entry: serde_json::Value,
}

/// What creating a fleet rollout stores.
pub struct NewFleetRollout<'a> {
    pub id: &'a str,
    pub hardware_id: &'a str,
    pub version: &'a str,
    pub status: &'a str,
    pub machine: &'a str,
    pub depot_plan: &'a serde_json::Value,
    pub log_entry: &'a serde_json::Value,
}

/// One step of a fleet rollout to store.
pub struct FleetStep<'a> {
    pub id: &'a str,
    /// The revision the step was computed from.
    pub revision: i64,
    pub status: &'a str,
    pub machine: &'a str,
    pub log_entry: &'a serde_json::Value,
    /// An operator's action to audit: (actor, action).
    pub audit: Option<(&'a str, &'a str)>,
}

const COLUMNS: &str = "id, hardware_id, version, status, machine, depot_plan, revision, created_ms, created_by, updated_ms";

fn row(r: &sqlx::any::AnyRow) -> Result<FleetRolloutRow, sqlx::Error> {
    Ok(FleetRolloutRow {
        id: r.try_get("id")?,
        hardware_id: r.try_get("hardware_id")?,
        version: r.try_get("version")?,
        status: r.try_get("status")?,
        machine: r.try_get("machine")?,
        depot_plan: json_of(&r.try_get::<String, _>("depot_plan")?),
        revision: r.try_get("revision")?,
        created_ms: r.try_get("created_ms")?,
        created_by: r.try_get("created_by")?,
        updated_ms: r.try_get("updated_ms")?,
    })
}

impl CloudStore {
    /// Stores a new fleet rollout with its first log entry; audited as `fleet_rollout.create`.
    pub async fn create_fleet_rollout(
        &self,
        new: NewFleetRollout<'_>,
        actor: &str,
        now_ms: i64,
    ) -> Result<(), CloudStoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO fleet_rollouts (id, hardware_id, version, status, machine, depot_plan, revision, created_ms, created_by, updated_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, 1, $7, $8, $7)",
        )
        .bind(new.id)
        .bind(new.hardware_id)
        .bind(new.version)
        .bind(new.status)
        .bind(new.machine)
        .bind(new.depot_plan.to_string())
        .bind(now_ms)
        .bind(actor)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO fleet_rollout_log (rollout_id, at_ms, entry) VALUES ($1, $2, $3)")
            .bind(new.id)
            .bind(now_ms)
            .bind(new.log_entry.to_string())
            .execute(&mut *tx)
            .await?;
        audit_in(
            &mut tx,
            now_ms,
            actor,
            "fleet_rollout.create",
            Some(new.id),
            "ok",
            new.log_entry,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores a step if the rollout is still at `step.revision`; `Ok(false)` when another
    /// step got there first (read again and redo).
    pub async fn step_fleet_rollout(
        &self,
        step: FleetStep<'_>,
        now_ms: i64,
    ) -> Result<bool, CloudStoreError> {
        let FleetStep {
            id,
            revision,
            status,
            machine,
            log_entry,
            audit,
        } = step;
        let mut tx = self.pool.begin().await?;
        let stored = sqlx::query(
            "UPDATE fleet_rollouts SET status = $1, machine = $2, revision = revision + 1, updated_ms = $3 \
             WHERE id = $4 AND revision = $5",
        )
        .bind(status)
        .bind(machine)
        .bind(now_ms)
        .bind(id)
        .bind(revision)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !stored {
            return Ok(false);
        }
        sqlx::query("INSERT INTO fleet_rollout_log (rollout_id, at_ms, entry) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(now_ms)
            .bind(log_entry.to_string())
            .execute(&mut *tx)
            .await?;
        if let Some((actor, action)) = audit {
            audit_in(&mut tx, now_ms, actor, action, Some(id), "ok", log_entry).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Every fleet rollout, newest first.
    pub async fn fleet_rollouts(&self) -> Result<Vec<FleetRolloutRow>, CloudStoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM fleet_rollouts ORDER BY created_ms DESC, id"
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(row).collect::<Result<_, _>>()?)
    }

    pub async fn fleet_rollout(&self, id: &str) -> Result<FleetRolloutRow, CloudStoreError> {
        let r = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM fleet_rollouts WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| CloudStoreError::UnknownFleetRollout(id.to_owned()))?;
        Ok(row(&r)?)
    }

    /// The newest `limit` log entries of a fleet rollout, oldest first.
    pub async fn fleet_log(
        &self,
        id: &str,
        limit: i64,
    ) -> Result<Vec<FleetLogRow>, CloudStoreError> {
        let rows = sqlx::query(
            "SELECT at_ms, entry FROM fleet_rollout_log WHERE rollout_id = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out = rows
            .iter()
            .map(|r| {
                Ok(FleetLogRow {
                    at_ms: r.try_get("at_ms")?,
                    entry: json_of(&r.try_get::<String, _>("entry")?),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        out.reverse();
        Ok(out)
    }

    /// One reported object of a depot, by the depot's name.
    pub async fn reported_object(
        &self,
        depot_name: &str,
        kind: &str,
        key: &str,
    ) -> Result<Option<crate::ReportedRow>, CloudStoreError> {
        let r = sqlx::query(
            "SELECT r.observed_generation, r.observed_ms, r.json FROM reported r JOIN depots d ON d.id = r.depot_id \
             WHERE d.name = $1 AND r.kind = $2 AND r.key = $3 AND r.deleted = 0",
        )
        .bind(depot_name)
        .bind(kind)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        r.map(|r| {
            Ok(crate::ReportedRow {
                kind: kind.to_owned(),
                key: key.to_owned(),
                observed_generation: r.try_get("observed_generation")?,
                observed_ms: r.try_get("observed_ms")?,
                json: json_of(&r.try_get::<String, _>("json")?),
                deleted: false,
            })
        })
        .transpose()
        .map_err(CloudStoreError::Query)
    }

    /// One current desired object of a depot, by the depot's name.
    pub async fn desired_object(
        &self,
        depot_name: &str,
        kind: &str,
        key: &str,
    ) -> Result<Option<crate::DesiredRow>, CloudStoreError> {
        let depot = self.depot(depot_name).await?;
        Ok(self
            .desired_of(&depot.id)
            .await?
            .into_iter()
            .find(|d| d.kind == kind && d.key == key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn a_step_from_a_stale_read_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("cloud.db").display());
        let store = CloudStore::connect(&url).await.unwrap();
        let plan = json!({"waves": [{"count": 3}]});
        store
            .create_fleet_rollout(
                NewFleetRollout {
                    id: "fr-1",
                    hardware_id: "hw",
                    version: "2.0.0",
                    status: "running",
                    machine: "{}",
                    depot_plan: &plan,
                    log_entry: &json!({"event": "created"}),
                },
                "token:ops",
                10,
            )
            .await
            .unwrap();
        let read = store.fleet_rollout("fr-1").await.unwrap();
        assert_eq!((read.revision, read.depot_plan.clone()), (1, plan));
        let entry = json!({"event": "reports"});
        let step = |revision, status| FleetStep {
            id: "fr-1",
            revision,
            status,
            machine: "{\"x\":1}",
            log_entry: &entry,
            audit: None,
        };
        assert!(
            store
                .step_fleet_rollout(step(1, "paused"), 20)
                .await
                .unwrap()
        );
        // A second instance computed its step from revision 1 too: dropped, nothing changes.
        assert!(
            !store
                .step_fleet_rollout(step(1, "halted"), 30)
                .await
                .unwrap()
        );
        let now = store.fleet_rollout("fr-1").await.unwrap();
        assert_eq!((now.revision, now.status.as_str()), (2, "paused"));
        let log = store.fleet_log("fr-1", 10).await.unwrap();
        assert_eq!(
            log.iter().map(|l| l.at_ms).collect::<Vec<_>>(),
            [10, 20],
            "oldest first, the dropped step not logged"
        );
        assert!(matches!(
            store.fleet_rollout("fr-2").await,
            Err(CloudStoreError::UnknownFleetRollout(_))
        ));
    }
}
