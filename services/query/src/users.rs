//! The user activity read model: profiles (`read.users`) and each user's
//! timeline of activities.

use std::time::SystemTime;

use eventfold_domain::Sensitive;
use eventfold_store::from_bigint;

use crate::{Query, Result, column, one_page};

/// The projection of users and their activity.
pub(crate) const USERS: &str = "user_activity";

/// A registered user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UserRecord {
    pub(crate) user_id: String,
    pub(crate) email: Sensitive<String>,
    pub(crate) display_name: String,
    pub(crate) registered_at: SystemTime,
    pub(crate) logins: i64,
    pub(crate) actions: i64,
    pub(crate) last_seen_at: SystemTime,
}

/// One entry of a user's timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ActivityRecord {
    pub(crate) global_position: u64,
    pub(crate) kind: String,
    /// The email for `registered`: sensitive, as the proto field says.
    pub(crate) detail: Sensitive<String>,
    pub(crate) occurred_at: SystemTime,
}

impl Query {
    /// The profile of `user_id` (if registered) and one page of at most
    /// `size` of its activities, newest first, before global position
    /// `before`, in one snapshot; and whether more activities follow.
    pub(crate) async fn user_activity(
        &self,
        user_id: &str,
        size: i64,
        before: Option<i64>,
    ) -> Result<(Option<UserRecord>, Vec<ActivityRecord>, bool)> {
        let mut conn = self.conn().await?;
        let tx = conn.build_transaction().read_only(true).start().await?;
        let user = tx
            .query_opt(
                "SELECT user_id, email, display_name, registered_at, logins, actions, last_seen_at \
                   FROM read.users WHERE user_id = $1",
                &[&user_id],
            )
            .await?;
        let rows = tx
            .query(
                "SELECT global_position, kind, detail, occurred_at FROM read.user_activity \
                  WHERE user_id = $1 AND global_position < $2 ORDER BY global_position DESC LIMIT $3",
                &[&user_id, &before.unwrap_or(i64::MAX), &size.saturating_add(1)],
            )
            .await?;
        tx.commit().await?;
        let user = match user {
            Some(row) => Some(UserRecord {
                user_id: column(&row, 0)?,
                email: column::<String>(&row, 1)?.into(),
                display_name: column(&row, 2)?,
                registered_at: column(&row, 3)?,
                logins: column(&row, 4)?,
                actions: column(&row, 5)?,
                last_seen_at: column(&row, 6)?,
            }),
            None => None,
        };
        let activities = rows
            .iter()
            .map(|row| {
                Ok(ActivityRecord {
                    global_position: from_bigint(column(row, 0)?),
                    kind: column(row, 1)?,
                    detail: column::<String>(row, 2)?.into(),
                    occurred_at: column(row, 3)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (activities, more) = one_page(activities, size);
        Ok((user, activities, more))
    }
}
