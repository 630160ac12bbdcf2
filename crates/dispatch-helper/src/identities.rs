//! The lane accounts' identities (uid, gid, groups, home), looked up at most once a second
//! each. A lookup goes through NSS (`/etc/passwd` and `/etc/group`, and under systemd a
//! varlink call to its user database): about 120 µs per dispatch here, more where systemd's
//! user database answers, and the largest share of validating one; a cached one takes 0.2 µs.
//! A change to an account (its groups, say) reaches the lanes that start a second later; a
//! reload of the configuration starts a fresh cache (it lives in `Settings`). A failed lookup
//! is never kept: the next dispatch looks again.

use dispatch_sandbox::{LaneIdentity, SandboxError, resolve_identity};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a looked-up identity is used before it is looked up again.
pub const FRESH_FOR: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct IdentityCache {
    /// By account name; as many entries as the allowlist has lane accounts.
    entries: Mutex<HashMap<String, (Instant, LaneIdentity)>>,
}

impl IdentityCache {
    pub fn resolve(&self, name: &str) -> Result<LaneIdentity, SandboxError> {
        self.resolve_with(name, resolve_identity)
    }

    /// The helper's own account (every lane's, without root).
    pub fn resolve_own(&self) -> Result<LaneIdentity, SandboxError> {
        // No account name contains NUL: this key is nobody else's.
        self.resolve_with("\0own", |_| dispatch_sandbox::current_identity())
    }

    fn resolve_with(
        &self,
        name: &str,
        look_up: impl FnOnce(&str) -> Result<LaneIdentity, SandboxError>,
    ) -> Result<LaneIdentity, SandboxError> {
        let cached = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .filter(|(at, _)| at.elapsed() < FRESH_FOR)
            .map(|(_, identity)| identity.clone());
        if let Some(identity) = cached {
            return Ok(identity);
        }
        let identity = look_up(name)?;
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), (Instant::now(), identity.clone()));
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(groups: Vec<u32>) -> LaneIdentity {
        LaneIdentity {
            name: "acme".into(),
            uid: 1000,
            gid: 1000,
            groups,
            home: "/home/acme".into(),
        }
    }

    #[test]
    fn a_lookup_is_reused_for_a_second_then_done_again() {
        let cache = IdentityCache::default();
        let first = cache
            .resolve_with("acme", |_| Ok(identity(vec![1000, 5])))
            .unwrap();
        let again = cache
            .resolve_with("acme", |_| panic!("looked up again within a second"))
            .unwrap();
        assert_eq!(first.groups, again.groups);
        std::thread::sleep(FRESH_FOR + Duration::from_millis(50));
        let later = cache
            .resolve_with("acme", |_| Ok(identity(vec![1000])))
            .unwrap();
        assert_eq!(
            later.groups,
            vec![1000],
            "a changed account is seen after a second"
        );
    }

    #[test]
    fn a_failed_lookup_is_not_kept() {
        let cache = IdentityCache::default();
        let failed = cache.resolve_with("gone", |name| {
            Err(SandboxError::Identity {
                user: name.into(),
                reason: "no such user on this machine".into(),
            })
        });
        assert!(failed.is_err());
        assert!(cache.resolve_with("gone", |_| Ok(identity(vec![]))).is_ok());
    }
}
