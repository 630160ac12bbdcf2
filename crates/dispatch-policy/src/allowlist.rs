//! The `.repos.json` allowlist, in the shape the Python server read:
//!
//! ```json
//! { "orgs":  { "acme": { "unix_user": "acme-lane", "allowed_clients": { "users": ["alice"], "groups": ["dev"] } } },
//!   "repos": { "widgets": { "org": "acme", "github": "acme/widgets" } } }
//! ```
//!
//! `unix_user` and `allowed_clients` are optional additions; unknown keys are ignored because the
//! file is shared with other tools. Unlike the Python server nothing is dropped silently: every
//! skipped entry comes back as a warning that names it and says why.

use crate::error::{PolicyError, escape_value};
use crate::names::{OrgUser, RepoName, UnixUserName, validate_name};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub repo: RepoName,
    pub orguser: OrgUser,
    /// `owner/repo` on GitHub.
    pub github: String,
}

/// Local users and groups that may dispatch to an org. `None` on the org means: any client the
/// helper admits.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AllowedClients {
    pub users: Vec<UnixUserName>,
    pub groups: Vec<UnixUserName>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgPolicy {
    pub orguser: OrgUser,
    /// The local account the org's lanes run as; defaults to the org name.
    pub unix_user: UnixUserName,
    /// Whether `unix_user` was written in the file (as opposed to defaulted).
    pub unix_user_explicit: bool,
    pub allowed_clients: Option<AllowedClients>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Allowlist {
    orgs: BTreeMap<OrgUser, OrgPolicy>,
    targets: BTreeMap<RepoName, Target>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedAllowlist {
    pub allowlist: Allowlist,
    /// One line per skipped entry, naming it and the reason.
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AllowlistError {
    #[error("cannot read allowlist {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("allowlist {path} is not valid JSON: {message}")]
    Json { path: String, message: String },
    #[error("allowlist {path}: {message}")]
    Shape { path: String, message: String },
}

impl Allowlist {
    pub fn load(path: &Path) -> Result<LoadedAllowlist, AllowlistError> {
        let text = std::fs::read_to_string(path).map_err(|source| AllowlistError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parse the file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<LoadedAllowlist, AllowlistError> {
        let root: Value = serde_json::from_str(text).map_err(|error| AllowlistError::Json {
            path: origin.to_owned(),
            message: error.to_string(),
        })?;
        let shape = |message: &str| AllowlistError::Shape {
            path: origin.to_owned(),
            message: message.to_owned(),
        };
        let root = root
            .as_object()
            .ok_or_else(|| shape("the top level must be a JSON object"))?;
        let empty = Map::new();
        let orgs_json = match root.get("orgs") {
            None => &empty,
            Some(Value::Object(orgs)) => orgs,
            Some(_) => return Err(shape("\"orgs\" must be an object of org-user entries")),
        };
        let repos_json = match root.get("repos") {
            None => &empty,
            Some(Value::Object(repos)) => repos,
            Some(_) => return Err(shape("\"repos\" must be an object of repo entries")),
        };

        let mut warnings = Vec::new();
        let mut orgs = BTreeMap::new();
        for (name, entry) in orgs_json {
            match parse_org(name, entry) {
                Ok(org) => {
                    orgs.insert(org.orguser.clone(), org);
                }
                Err(why) => warnings.push(format!("org {} skipped: {why}", escape_value(name))),
            }
        }
        let mut targets = BTreeMap::new();
        for (name, entry) in repos_json {
            match parse_repo(name, entry, &orgs) {
                Ok(target) => {
                    targets.insert(target.repo.clone(), target);
                }
                Err(why) => warnings.push(format!("repo {} skipped: {why}", escape_value(name))),
            }
        }
        if targets.is_empty() {
            warnings.push("no valid targets: every dispatch will be rejected".to_owned());
        }
        Ok(LoadedAllowlist {
            allowlist: Allowlist { orgs, targets },
            warnings,
        })
    }

    pub fn targets(&self) -> impl Iterator<Item = &Target> {
        self.targets.values()
    }

    pub fn orgs(&self) -> impl Iterator<Item = &OrgPolicy> {
        self.orgs.values()
    }

    pub fn org(&self, orguser: &OrgUser) -> Option<&OrgPolicy> {
        self.orgs.get(orguser)
    }

    /// Validate a caller's `(orguser, repo)` pair and resolve it to its lane. The checks and
    /// their order follow the Python server: names, unknown org-user, unknown repo, owner.
    pub fn resolve(&self, orguser: &str, repo: &str) -> Result<(&OrgPolicy, &Target), PolicyError> {
        self.resolve_visible(orguser, repo, |_| true)
    }

    /// `resolve` for a caller who may only see some orgs: an org it may not use, and that
    /// org's repos, are "unknown" to it, and the lists in the errors name only what it may use.
    pub fn resolve_visible(
        &self,
        orguser: &str,
        repo: &str,
        visible: impl Fn(&OrgPolicy) -> bool,
    ) -> Result<(&OrgPolicy, &Target), PolicyError> {
        let orguser_name = OrgUser::parse(orguser)?;
        let repo_name = RepoName::parse(repo)?;
        let seen = |org: &OrgUser| self.orgs.get(org).is_some_and(&visible);
        let Some(org) = self.orgs.get(&orguser_name).filter(|org| visible(org)) else {
            return Err(PolicyError::UnknownOrgUser {
                orguser: escape_value(orguser),
                known: list_or_none(
                    self.orgs
                        .keys()
                        .filter(|o| seen(o))
                        .map(ToString::to_string),
                ),
            });
        };
        let Some(target) = self.targets.get(&repo_name).filter(|t| seen(&t.orguser)) else {
            return Err(PolicyError::UnknownRepo {
                repo: escape_value(repo),
                known: list_or_none(
                    self.targets
                        .values()
                        .filter(|t| seen(&t.orguser))
                        .map(|t| format!("{}/{}", t.orguser, t.repo)),
                ),
            });
        };
        if target.orguser != orguser_name {
            return Err(PolicyError::OwnerMismatch {
                repo: repo.to_owned(),
                owner: target.orguser.to_string(),
                orguser: orguser.to_owned(),
            });
        }
        Ok((org, target))
    }

    /// `orguser/repo` for every target, for error messages.
    pub fn known_targets(&self) -> String {
        list_or_none(
            self.targets
                .values()
                .map(|t| format!("{}/{}", t.orguser, t.repo)),
        )
    }
}

fn list_or_none(items: impl Iterator<Item = String>) -> String {
    const SHOWN: usize = 50;
    let items: Vec<String> = items.collect();
    if items.is_empty() {
        return "(none)".to_owned();
    }
    let mut text = items
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        text.push_str(&format!(", … ({} in all)", items.len()));
    }
    text
}

fn parse_org(name: &str, entry: &Value) -> Result<OrgPolicy, String> {
    let orguser = OrgUser::parse(name).map_err(|e| e.to_string())?;
    let entry = entry.as_object().ok_or("the entry must be a JSON object")?;
    let (unix_user, unix_user_explicit) = match entry.get("unix_user") {
        None | Some(Value::Null) => (UnixUserName::parse(name).map_err(|e| e.to_string())?, false),
        Some(Value::String(user)) => (UnixUserName::parse(user).map_err(|e| e.to_string())?, true),
        Some(_) => return Err("\"unix_user\" must be a string".into()),
    };
    let allowed_clients = match entry.get("allowed_clients") {
        None | Some(Value::Null) => None,
        Some(Value::Object(clients)) => Some(AllowedClients {
            users: name_list(clients.get("users"), "allowed_clients.users")?,
            groups: name_list(clients.get("groups"), "allowed_clients.groups")?,
        }),
        Some(_) => {
            return Err(
                "\"allowed_clients\" must be an object with \"users\" and/or \"groups\"".into(),
            );
        }
    };
    Ok(OrgPolicy {
        orguser,
        unix_user,
        unix_user_explicit,
        allowed_clients,
    })
}

fn name_list(value: Option<&Value>, field: &str) -> Result<Vec<UnixUserName>, String> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .ok_or_else(|| format!("\"{field}\" must list strings"))
                    .and_then(|s| UnixUserName::parse(s).map_err(|e| e.to_string()))
            })
            .collect(),
        Some(_) => Err(format!("\"{field}\" must be an array of names")),
    }
}

fn parse_repo(
    name: &str,
    entry: &Value,
    orgs: &BTreeMap<OrgUser, OrgPolicy>,
) -> Result<Target, String> {
    let repo = RepoName::parse(name).map_err(|e| e.to_string())?;
    let entry = entry.as_object().ok_or("the entry must be a JSON object")?;
    let org = entry
        .get("org")
        .and_then(Value::as_str)
        .ok_or("\"org\" is missing or not a string")?;
    let orguser = OrgUser::parse(org).map_err(|e| e.to_string())?;
    if !orgs.contains_key(&orguser) {
        return Err(format!(
            "its org {} is not declared under \"orgs\"",
            escape_value(org)
        ));
    }
    // As the Python server did: a repo without "github" is known by its own name there.
    let github = match entry.get("github") {
        None | Some(Value::Null) => repo.to_string(),
        Some(Value::String(github)) => {
            validate_github(github)?;
            github.clone()
        }
        Some(_) => return Err("\"github\" must be a string".into()),
    };
    Ok(Target {
        repo,
        orguser,
        github,
    })
}

fn validate_github(github: &str) -> Result<(), String> {
    let bad = || format!("\"github\" {} must be \"owner/repo\"", escape_value(github));
    let (owner, repo) = github.split_once('/').ok_or_else(bad)?;
    validate_name("github owner", owner).map_err(|e| e.to_string())?;
    // GitHub repo names may start with a dot (".github"), but never be "." or "..".
    let repo_ok = !repo.is_empty()
        && repo.len() <= 100
        && repo != "."
        && !repo.contains("..")
        && repo
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if repo_ok { Ok(()) } else { Err(bad()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Python server's fixture shape: two valid targets, an orphan org reference and a
    /// malformed entry.
    const FIXTURE: &str = r#"{
        "orgs": {
            "acme": {"note": "shared with other tools"},
            "globex": {"unix_user": "globex-lane", "allowed_clients": {"users": ["alice"], "groups": ["dev"]}}
        },
        "repos": {
            "widgets": {"org": "acme", "github": "acme/widgets"},
            "gadgets": {"org": "globex", "github": "globex/gadgets", "extra": 1},
            "orphan": {"org": "initech", "github": "initech/orphan"},
            "broken": {"org": "acme"},
            "notobject": "acme/x"
        }
    }"#;

    fn fixture() -> LoadedAllowlist {
        Allowlist::parse(FIXTURE, "fixture").unwrap()
    }

    #[test]
    fn fixture_has_two_targets_and_names_every_skip() {
        let loaded = fixture();
        let targets: Vec<_> = loaded
            .allowlist
            .targets()
            .map(|t| t.repo.to_string())
            .collect();
        assert_eq!(targets, ["broken", "gadgets", "widgets"]);
        // Without "github" a repo is known there by its own name, as the Python server had it.
        let broken = loaded
            .allowlist
            .targets()
            .find(|t| t.repo.as_str() == "broken")
            .unwrap();
        assert_eq!(broken.github, "broken");
        let warnings = loaded.warnings.join("\n");
        assert!(
            warnings.contains("repo \"orphan\" skipped: its org \"initech\" is not declared"),
            "{warnings}"
        );
        assert!(
            warnings.contains("repo \"notobject\" skipped: the entry must be a JSON object"),
            "{warnings}"
        );
        assert_eq!(loaded.warnings.len(), 2, "{warnings}");
    }

    #[test]
    fn unix_user_defaults_to_org_name_and_clients_parse() {
        let loaded = fixture();
        let acme = loaded
            .allowlist
            .org(&OrgUser::parse("acme").unwrap())
            .unwrap();
        assert_eq!(acme.unix_user.as_str(), "acme");
        assert!(!acme.unix_user_explicit);
        assert!(acme.allowed_clients.is_none());
        let globex = loaded
            .allowlist
            .org(&OrgUser::parse("globex").unwrap())
            .unwrap();
        assert_eq!(globex.unix_user.as_str(), "globex-lane");
        let clients = globex.allowed_clients.as_ref().unwrap();
        assert_eq!(clients.users[0].as_str(), "alice");
        assert_eq!(clients.groups[0].as_str(), "dev");
    }

    #[test]
    fn resolve_accepts_the_owner() {
        let loaded = fixture();
        let (org, target) = loaded.allowlist.resolve("acme", "widgets").unwrap();
        assert_eq!(org.orguser.as_str(), "acme");
        assert_eq!(target.github, "acme/widgets");
    }

    #[test]
    fn owner_mismatch_is_rejected() {
        let err = fixture()
            .allowlist
            .resolve("acme", "gadgets")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "repo gadgets belongs to orguser globex, not acme");
    }

    #[test]
    fn unknown_repo_lists_known_targets() {
        let err = fixture()
            .allowlist
            .resolve("acme", "nope")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "unknown repo \"nope\"; known targets: acme/broken, globex/gadgets, acme/widgets"
        );
    }

    #[test]
    fn orgs_a_caller_may_not_use_are_unknown_to_it() {
        let allowlist = fixture().allowlist;
        let only_acme = |org: &OrgPolicy| org.orguser.as_str() == "acme";
        let err = allowlist
            .resolve_visible("globex", "gadgets", only_acme)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "unknown orguser \"globex\"; known org-users: acme");
        let err = allowlist
            .resolve_visible("acme", "gadgets", only_acme)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "unknown repo \"gadgets\"; known targets: acme/broken, acme/widgets"
        );
        assert!(
            allowlist
                .resolve_visible("acme", "widgets", only_acme)
                .is_ok()
        );
    }

    #[test]
    fn orphan_and_malformed_are_not_targets() {
        let allowlist = fixture().allowlist;
        assert!(matches!(
            allowlist.resolve("initech", "orphan"),
            Err(PolicyError::UnknownOrgUser { .. })
        ));
        // A repo without "github" is a target, named by itself there.
        assert!(allowlist.resolve("acme", "broken").is_ok());
    }

    #[test]
    fn hostile_names_are_rejected_before_lookup() {
        let allowlist = fixture().allowlist;
        for (orguser, repo) in [
            ("acme", "../widgets"),
            ("acme/..", "widgets"),
            ("acme", "widgets "),
            (" acme", "widgets"),
        ] {
            let err = allowlist.resolve(orguser, repo).unwrap_err();
            assert!(
                matches!(err, PolicyError::InvalidName { .. }),
                "{orguser:?}/{repo:?}: {err}"
            );
        }
    }

    #[test]
    fn bad_shapes_are_errors_not_empty_allowlists() {
        for (text, wanted) in [
            ("[]", "top level must be a JSON object"),
            ("{\"repos\": []}", "\"repos\" must be an object"),
            ("{\"orgs\": 3}", "\"orgs\" must be an object"),
            ("{", "not valid JSON"),
        ] {
            let err = Allowlist::parse(text, "f.json").unwrap_err().to_string();
            assert!(err.contains(wanted), "{text}: {err}");
        }
    }

    #[test]
    fn bad_org_entries_are_named() {
        let loaded = Allowlist::parse(
            r#"{"orgs": {"a": {"unix_user": 5}, "b/c": {}, "d": {"allowed_clients": {"users": ["x y"]}}},
                "repos": {}}"#,
            "f",
        )
        .unwrap();
        let warnings = loaded.warnings.join("\n");
        assert!(
            warnings.contains("org \"a\" skipped: \"unix_user\" must be a string"),
            "{warnings}"
        );
        assert!(
            warnings.contains("org \"b/c\" skipped: invalid orguser"),
            "{warnings}"
        );
        assert!(
            warnings.contains("org \"d\" skipped: invalid unix_user \"x y\""),
            "{warnings}"
        );
        assert!(warnings.contains("no valid targets"), "{warnings}");
    }

    #[test]
    fn github_must_be_owner_slash_repo() {
        for bad in ["acme", "acme/", "/x", "a/b/c", "acme/..", "acme/x y"] {
            let text = format!(
                r#"{{"orgs": {{"acme": {{}}}}, "repos": {{"r": {{"org": "acme", "github": "{bad}"}}}}}}"#
            );
            let loaded = Allowlist::parse(&text, "f").unwrap();
            assert_eq!(loaded.allowlist.targets().count(), 0, "{bad} accepted");
        }
        let ok =
            r#"{"orgs": {"acme": {}}, "repos": {"r": {"org": "acme", "github": "acme/.github"}}}"#;
        assert_eq!(
            Allowlist::parse(ok, "f")
                .unwrap()
                .allowlist
                .targets()
                .count(),
            1
        );
    }
}
