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
    "ssl-cert",
    "ssh_keys",
];

/// What NSS and the filesystem say about an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub home: PathBuf,
    /// Owner of the home directory, if it exists.
    pub home_owner: Option<u32>,
    /// The account's primary and supplementary groups, by name (a gid without one by number).
    pub groups: Vec<String>,
}

impl Account {
    /// Look the account up (NSS, stat). Anything that cannot be told is an error, so the
    /// account is refused rather than trusted.
    pub fn lookup(name: &str) -> Result<Account, String> {
        let user = match nix::unistd::User::from_name(name) {
            Ok(Some(user)) => user,
            Ok(None) => return Err(format!("unix user {name} does not exist")),
            Err(error) => return Err(format!("unix user {name} could not be looked up: {error}")),
        };
        let cname = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
        let gids = nix::unistd::getgrouplist(&cname, user.gid)
            .map_err(|e| format!("the groups of unix user {name} could not be listed: {e}"))?;
        let groups = gids
            .into_iter()
            .chain(std::iter::once(user.gid))
            .map(|gid| match nix::unistd::Group::from_gid(gid) {
                Ok(Some(group)) => group.name,
                _ => gid.to_string(),
            })
            .collect();
        let home_owner = match std::fs::metadata(&user.dir) {
            Ok(meta) => Some(meta.uid()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => {
                return Err(format!(
                    "the home {} of unix user {name} cannot be examined: {error}",
                    user.dir.display()
                ));
            }
        };
        Ok(Account {
            home_owner,
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
    lookup: impl Fn(&str) -> Result<Account, String>,
) -> BTreeMap<String, String> {
    let mut refused = BTreeMap::new();
    // Shared accounts by uid, not by name: two passwd names can carry one uid.
    let mut orgs_by_uid: BTreeMap<u32, Vec<(&str, &str)>> = BTreeMap::new();
    for org in allowlist.orgs() {
        let (orguser, account) = (org.orguser.as_str(), org.unix_user.as_str());
        match lookup(account) {
            Err(reason) => {
                refused.insert(orguser.to_owned(), reason);
            }
            Ok(facts) => match refusal(&facts, forbidden_groups) {
                Some(reason) => {
                    refused.insert(orguser.to_owned(), reason);
                }
                None => orgs_by_uid
                    .entry(facts.uid)
                    .or_default()
                    .push((orguser, account)),
            },
        }
    }
    for (uid, orgs) in orgs_by_uid {
        if orgs.len() > 1 && !allow_shared {
            let names: Vec<String> = orgs
                .iter()
                .map(|(org, user)| format!("{org} ({user})"))
                .collect();
            let reason = format!(
                "uid {uid} runs the lanes of {} orgs: {}; each org's allowed_clients would apply \
                 to the others' lanes: give each its own account, or set \
                 allow_shared_unix_users = true",
                orgs.len(),
                names.join(", ")
            );
            for (org, _) in orgs {
                refused.insert(org.to_owned(), reason.clone());
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
        let lookup = |name: &str| {
            let uid = if name == "shared" { 1000 } else { 1001 };
            Ok(account(name, uid, "/home/x", Some(uid), &[]))
        };
        let refused = vet(&allowlist, &forbidden(), false, lookup);
        assert_eq!(refused.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert!(
            refused["a"].contains("runs the lanes of 2 orgs: a (shared), b (shared)"),
            "{refused:?}"
        );
        assert!(vet(&allowlist, &forbidden(), true, lookup).is_empty());
        // Two names, one uid: still shared.
        let same_uid = |name: &str| Ok(account(name, 1000, "/home/x", Some(1000), &[]));
        assert_eq!(vet(&allowlist, &forbidden(), false, same_uid).len(), 3);
        // What cannot be looked up is refused, not trusted.
        let broken = |name: &str| Err(format!("unix user {name} could not be looked up"));
        let refused = vet(&allowlist, &forbidden(), false, broken);
        assert_eq!(refused.len(), 3);
        assert!(refused["c"].contains("could not be looked up"));
    }
}
