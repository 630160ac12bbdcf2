//! Which unix accounts may run lanes (root mode). A lane runs with its account's powers, so an
//! account the allowlist names is checked when the configuration loads, not trusted: one whose
//! home is `/` (read access to the whole filesystem through the home rule) or belongs to someone
//! else, one in a privileged group (`docker`, `disk`, `shadow`, `sudo`, …: powers the sandbox
//! cannot take back), and one that two orgs share (each org's `allowed_clients` would silently
//! apply to the other's lanes) are refused, each with its reason. The org stays listed, and a
//! dispatch to it is refused with that reason.

use dispatch_policy::Allowlist;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// Groups whose members hold powers a sandboxed lane must not have. The administrator can
/// replace the list (`forbidden_lane_groups`).
pub const DEFAULT_FORBIDDEN_GROUPS: &[&str] = &[
    "root",
    "sudo",
    "wheel",
    "admin",
    "adm",
    "docker",
    "lxd",
    "incus",
    "libvirt",
    "kvm",
    "disk",
    "shadow",
    "systemd-journal",
    "staff",
];

/// What NSS and the filesystem say about an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub home: PathBuf,
    /// Owner of the home directory, if it exists.
    pub home_owner: Option<u32>,
    /// Names of the account's primary and supplementary groups.
    pub groups: Vec<String>,
}

impl Account {
    /// Look the account up (NSS, stat). `None` if it does not exist.
    pub fn lookup(name: &str) -> Option<Account> {
        let user = nix::unistd::User::from_name(name).ok().flatten()?;
        let cname = std::ffi::CString::new(name).ok()?;
        let gids = nix::unistd::getgrouplist(&cname, user.gid).unwrap_or_default();
        let groups = gids
            .into_iter()
            .chain(std::iter::once(user.gid))
            .filter_map(|gid| nix::unistd::Group::from_gid(gid).ok().flatten())
            .map(|group| group.name)
            .collect();
        Some(Account {
            home_owner: std::fs::metadata(&user.dir).ok().map(|m| m.uid()),
            name: user.name,
            uid: user.uid.as_raw(),
            home: user.dir,
            groups,
        })
    }
}

/// Why `account` may not run lanes, if it may not.
pub fn refusal(account: &Account, forbidden_groups: &[String]) -> Option<String> {
    let name = &account.name;
    if account.uid == 0 {
        return Some(format!("unix user {name} is root"));
    }
    if account.home == std::path::Path::new("/") {
        return Some(format!(
            "unix user {name} has / as its home, which lanes may read: give it a home of its own"
        ));
    }
    if let Some(owner) = account.home_owner
        && owner != account.uid
    {
        return Some(format!(
            "the home {} of unix user {name} belongs to uid {owner}, not to it",
            account.home.display()
        ));
    }
    let mut privileged: Vec<&str> = account
        .groups
        .iter()
        .filter(|group| forbidden_groups.contains(group))
        .map(String::as_str)
        .collect();
    privileged.sort_unstable();
    privileged.dedup();
    if !privileged.is_empty() {
        return Some(format!(
            "unix user {name} is in the privileged group(s) {}, whose powers a lane would hold \
             (see forbidden_lane_groups)",
            privileged.join(", ")
        ));
    }
    None
}

/// Check every org's account: the orgs refused, each with its reason. `lookup` is
/// [`Account::lookup`] outside tests.
pub fn vet(
    allowlist: &Allowlist,
    forbidden_groups: &[String],
    allow_shared: bool,
    lookup: impl Fn(&str) -> Option<Account>,
) -> BTreeMap<String, String> {
    let mut orgs_by_account: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for org in allowlist.orgs() {
        orgs_by_account
            .entry(org.unix_user.as_str())
            .or_default()
            .push(org.orguser.as_str());
    }
    let mut refused = BTreeMap::new();
    for (account, orgs) in &orgs_by_account {
        let reason = if orgs.len() > 1 && !allow_shared {
            Some(format!(
                "unix user {account} runs the lanes of {} orgs ({}): each org's allowed_clients \
                 would apply to the others' lanes; give each its own account, or set \
                 allow_shared_unix_users = true",
                orgs.len(),
                orgs.join(", ")
            ))
        } else {
            lookup(account).and_then(|facts| refusal(&facts, forbidden_groups))
        };
        if let Some(reason) = reason {
            for org in orgs {
                refused.insert((*org).to_owned(), reason.clone());
            }
        }
    }
    refused
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(name: &str, uid: u32, home: &str, owner: Option<u32>, groups: &[&str]) -> Account {
        Account {
            name: name.into(),
            uid,
            home: home.into(),
            home_owner: owner,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn forbidden() -> Vec<String> {
        DEFAULT_FORBIDDEN_GROUPS
            .iter()
            .map(|g| g.to_string())
            .collect()
    }

    #[test]
    fn an_account_with_powers_beyond_its_own_is_refused_with_the_reason() {
        let fine = account("acme", 1000, "/home/acme", Some(1000), &["acme"]);
        assert_eq!(refusal(&fine, &forbidden()), None);
        let no_home = account("nobody", 65534, "/nonexistent", None, &["nogroup"]);
        assert_eq!(refusal(&no_home, &forbidden()), None);
        let cases = [
            (
                account("daemon", 1, "/", Some(0), &["daemon"]),
                "has / as its home",
            ),
            (
                account("acme", 1000, "/home/bob", Some(1001), &["acme"]),
                "belongs to uid 1001",
            ),
            (
                account(
                    "acme",
                    1000,
                    "/home/acme",
                    Some(1000),
                    &["acme", "docker", "sudo"],
                ),
                "docker, sudo",
            ),
            (account("root", 0, "/root", Some(0), &["root"]), "is root"),
        ];
        for (facts, words) in cases {
            let reason = refusal(&facts, &forbidden()).unwrap_or_default();
            assert!(reason.contains(words), "{facts:?}: {reason}");
        }
        // The administrator's list, not the default, decides.
        let in_docker = account("acme", 1000, "/home/acme", Some(1000), &["docker"]);
        assert_eq!(refusal(&in_docker, &[]), None);
    }

    #[test]
    fn orgs_sharing_an_account_are_refused_unless_allowed() {
        let allowlist = Allowlist::parse(
            r#"{"orgs": {"a": {"unix_user": "shared"}, "b": {"unix_user": "shared"}, "c": {}},
                "repos": {"r1": {"org": "a"}, "r2": {"org": "b"}, "r3": {"org": "c"}}}"#,
            "test",
        )
        .unwrap()
        .allowlist;
        let lookup = |name: &str| Some(account(name, 1000, "/home/x", Some(1000), &[]));
        let refused = vet(&allowlist, &forbidden(), false, lookup);
        assert_eq!(refused.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert!(
            refused["a"].contains("runs the lanes of 2 orgs (a, b)"),
            "{refused:?}"
        );
        assert!(vet(&allowlist, &forbidden(), true, lookup).is_empty());
    }
}
