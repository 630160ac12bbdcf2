//! Durable job state: one JSON record per job under `<state_dir>/jobs/`, each written
//! atomically (temp file, fsync, rename, fsync of the directory), so a crash at any moment
//! leaves either the old record or the new one.

use dispatch_proto::JobView;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    /// Everything its owner may see: argv, output tails and sandbox included.
    #[serde(flatten)]
    pub job: JobView,
    /// The peer uid (SO_PEERCRED) that created the job: the only uid that can see it.
    pub owner_uid: u32,
    pub claimed_client: Option<String>,
    /// Process group of a running lane and its start time (clock ticks since boot, from
    /// /proc), so a stale group is only ever signalled if it is still the same process.
    pub pgid: Option<i32>,
    pub pgid_start_ticks: Option<u64>,
    /// While queued: the request in full, to be validated again and started when a slot
    /// frees (the helper's own state, root-only like the rest of this record).
    #[serde(default)]
    pub queued: Option<QueuedRequest>,
    /// The job's own directory (made by the helper; removed with this record unless the
    /// configuration keeps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueuedRequest {
    pub task: String,
}

/// How much of a record a view carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// Status and list: no argv, no output.
    Summary,
    /// Detailed list: argv, no output.
    Argv,
    /// Result: everything.
    Full,
}

impl JobRecord {
    pub fn view(&self, detail: Detail) -> JobView {
        let mut view = self.job.clone();
        if detail == Detail::Summary {
            view.argv = None;
        }
        if detail != Detail::Full {
            view.stdout = None;
            view.stderr = None;
        }
        view
    }
}

#[derive(Clone)]
pub struct JobStore {
    dir: PathBuf,
}

impl JobStore {
    pub fn open(state_dir: &Path) -> std::io::Result<JobStore> {
        let dir = state_dir.join("jobs");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(JobStore { dir })
    }

    fn path(&self, handle: &str) -> PathBuf {
        self.dir.join(format!("{handle}.json"))
    }

    /// `save` off the async runtime: the fsyncs must not stall a runtime worker.
    pub async fn save_async(&self, record: &JobRecord) -> std::io::Result<()> {
        let (store, record) = (self.clone(), record.clone());
        tokio::task::spawn_blocking(move || store.save(&record))
            .await
            .map_err(std::io::Error::other)?
    }

    pub async fn load_async(&self, handle: &str) -> std::io::Result<JobRecord> {
        let (store, handle) = (self.clone(), handle.to_owned());
        tokio::task::spawn_blocking(move || store.load(&handle))
            .await
            .map_err(std::io::Error::other)?
    }

    pub async fn remove_async(&self, handle: &str) -> std::io::Result<()> {
        let (store, handle) = (self.clone(), handle.to_owned());
        tokio::task::spawn_blocking(move || store.remove(&handle))
            .await
            .map_err(std::io::Error::other)?
    }

    pub fn save(&self, record: &JobRecord) -> std::io::Result<()> {
        let final_path = self.path(&record.job.handle);
        let temp_path = self.dir.join(format!(".{}.tmp", record.job.handle));
        let bytes = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp_path)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temp_path, &final_path)?;
        File::open(&self.dir)?.sync_all()
    }

    pub fn load(&self, handle: &str) -> std::io::Result<JobRecord> {
        let bytes = fs::read(self.path(handle))?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }

    pub fn remove(&self, handle: &str) -> std::io::Result<()> {
        fs::remove_file(self.path(handle))?;
        File::open(&self.dir)?.sync_all()
    }

    /// Every record, plus a warning for each file that could not be read (left in place).
    pub fn load_all(&self) -> std::io::Result<(Vec<JobRecord>, Vec<String>)> {
        let mut records = Vec::new();
        let mut warnings = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            if name.starts_with('.') && name.ends_with(".tmp") {
                // A write interrupted before its rename: the previous record (if any) stands.
                let _ = fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    serde_json::from_slice::<JobRecord>(&bytes).map_err(|e| e.to_string())
                }) {
                Ok(record) => records.push(record),
                Err(why) => {
                    warnings.push(format!("job record {} unreadable: {why}", path.display()))
                }
            }
        }
        Ok((records, warnings))
    }
}
