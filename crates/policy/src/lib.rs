//! AccessPolicy conditions in Cedar.
//!
//! An AccessPolicy names who (identities) may reach what (services); its
//! optional `when` is a Cedar condition over the current context, e.g.
//! `context.time.hour >= 8 && context.time.hour < 18` or
//! `context.process.user == "redis"`. Each condition becomes exactly one
//! Cedar policy, `permit(principal, action, resource) when { ... };`, parsed
//! as a single policy so a condition cannot smuggle in further policies.
//! Evaluation errors (a missing attribute, a type error) deny: fail closed.

use std::str::FromStr as _;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, EntityUid, Policy, PolicyId, PolicySet, Request,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("invalid Cedar condition: {0}")]
    Parse(String),
    #[error("condition is {len} bytes, limit {MAX_CONDITION_LEN}")]
    TooLong { len: usize },
    #[error("evaluation: {0}")]
    Eval(String),
}

pub const MAX_CONDITION_LEN: usize = 8 * 1024;

/// A parsed `when` condition.
#[derive(Debug, Clone)]
pub struct Condition {
    set: PolicySet,
    source: String,
}

fn uid(s: &str) -> Result<EntityUid, PolicyError> {
    EntityUid::from_str(s).map_err(|e| PolicyError::Eval(e.to_string()))
}

impl Condition {
    pub fn parse(name: &str, when: &str) -> Result<Condition, PolicyError> {
        if when.len() > MAX_CONDITION_LEN {
            return Err(PolicyError::TooLong { len: when.len() });
        }
        let text = format!("permit(principal, action, resource) when {{\n{when}\n}};");
        let policy = Policy::parse(Some(PolicyId::new(name)), text)
            .map_err(|e| PolicyError::Parse(render(&e)))?;
        let mut set = PolicySet::new();
        set.add(policy)
            .map_err(|e| PolicyError::Parse(e.to_string()))?;
        Ok(Condition {
            set,
            source: when.to_string(),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the condition holds in `context` (a JSON object). Errors
    /// during evaluation count as "does not hold" and are returned so they
    /// can be audited.
    pub fn holds(&self, context: &serde_json::Value) -> Result<bool, PolicyError> {
        let ctx = Context::from_json_value(context.clone(), None)
            .map_err(|e| PolicyError::Eval(e.to_string()))?;
        let req = Request::new(
            uid(r#"Tether::Process::"caller""#)?,
            uid(r#"Tether::Action::"connect""#)?,
            uid(r#"Tether::Service::"target""#)?,
            ctx,
            None,
        )
        .map_err(|e| PolicyError::Eval(e.to_string()))?;
        let resp = Authorizer::new().is_authorized(&req, &self.set, &Entities::empty());
        let errors: Vec<String> = resp.diagnostics().errors().map(|e| e.to_string()).collect();
        if !errors.is_empty() {
            return Err(PolicyError::Eval(errors.join("; ")));
        }
        Ok(resp.decision() == Decision::Allow)
    }
}

fn render(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// The time part of the context, in UTC: `unix`, `hour`, `minute`,
/// `weekday` (0 = Sunday) and `day` (days since the epoch).
pub fn time_context(unix: i64) -> serde_json::Value {
    let day = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // 1970-01-01 was a Thursday (4).
    let weekday = (day + 4).rem_euclid(7);
    serde_json::json!({
        "unix": unix,
        "day": day,
        "hour": secs / 3600,
        "minute": (secs % 3600) / 60,
        "weekday": weekday,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(unix: i64) -> serde_json::Value {
        serde_json::json!({ "time": time_context(unix), "node": "n1", "process": { "uid": 1000, "user": "alice" } })
    }

    #[test]
    fn time_window() {
        let c = Condition::parse(
            "office-hours",
            "context.time.hour >= 8 && context.time.hour < 18",
        )
        .unwrap();
        // 2026-11-23 10:00 UTC and 20:00 UTC.
        let ten = 1_795_428_000;
        assert_eq!(time_context(ten)["hour"], 10);
        assert_eq!(time_context(ten)["weekday"], 1, "a Monday");
        assert!(c.holds(&ctx(ten)).unwrap());
        assert!(!c.holds(&ctx(ten + 10 * 3600)).unwrap());
    }

    #[test]
    fn process_attributes_and_fail_closed() {
        let c = Condition::parse(
            "p",
            r#"context.process.user == "alice" && context.node == "n1""#,
        )
        .unwrap();
        assert!(c.holds(&ctx(0)).unwrap());
        let c = Condition::parse("p", "context.process.nonexistent == 1").unwrap();
        assert!(
            c.holds(&ctx(0)).is_err(),
            "missing attribute must not allow"
        );
    }

    #[test]
    fn rejects_bad_and_smuggled_conditions() {
        assert!(matches!(
            Condition::parse("p", "context.time.hour >="),
            Err(PolicyError::Parse(_))
        ));
        let smuggle = "true }; permit(principal, action, resource) when { true";
        assert!(
            Condition::parse("p", smuggle).is_err(),
            "a second policy was accepted"
        );
        assert!(matches!(
            Condition::parse("p", &"x".repeat(MAX_CONDITION_LEN + 1)),
            Err(PolicyError::TooLong { .. })
        ));
    }
}
