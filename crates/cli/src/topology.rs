//! Where this process sits in a multi-host cluster: from flags, from `TF_CONFIG` (set by
//! Kubeflow's TFJob and Volcano) or from Slurm's variables.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;

/// This process's job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The parameter server: shard `k` of a sharded run (0 when unsharded).
    Ps(u32),
    /// Worker with this index.
    Worker(u32),
}

/// The cluster as this process sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// This process's job.
    pub role: Role,
    /// Every parameter server's `host:port`, shard 0 first (one unless sharded).
    pub ps: Vec<String>,
    /// Workers in the cluster (N + b).
    pub workers: u32,
    /// Where it came from (`TF_CONFIG`, `Slurm`).
    pub source: &'static str,
}

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let role = match self.role {
            Role::Ps(_) if self.ps.len() == 1 => "parameter server".to_string(),
            Role::Ps(k) => format!("parameter server shard {k} of {}", self.ps.len()),
            Role::Worker(i) => format!("worker {i}"),
        };
        let servers = match self.ps.len() {
            1 => "server".to_string(),
            n => format!("{n} servers (shard 0 first)"),
        };
        write!(
            f,
            "topology from {}: this process is the {role}; {servers} {}; {} workers",
            self.source,
            self.ps.join(","),
            self.workers
        )
    }
}

#[derive(Deserialize)]
struct TfConfig {
    cluster: BTreeMap<String, Vec<String>>,
    task: TfTask,
}

#[derive(Deserialize)]
struct TfTask {
    #[serde(rename = "type")]
    kind: String,
    index: u32,
}

/// Parses `TF_CONFIG`: each `ps` entry is one parameter server (several: the shards of a
/// sharded run, `ps[0]` running the coordinator); the `chief`, if any, is worker 0 and
/// `worker[i]` follows it.
pub fn from_tf_config(json: &str) -> Result<Topology> {
    let c: TfConfig = serde_json::from_str(json)
        .context("TF_CONFIG is not valid: expected {\"cluster\": {\"ps\": [...], \"worker\": [...]}, \"task\": {\"type\": ..., \"index\": ...}}")?;
    let ps = c.cluster.get("ps").cloned().unwrap_or_default();
    if ps.is_empty() {
        bail!("TF_CONFIG has no cluster.ps entry: quorum needs at least one parameter server");
    }
    let chiefs = c.cluster.get("chief").map_or(0, Vec::len) as u32;
    let workers = chiefs + c.cluster.get("worker").map_or(0, Vec::len) as u32;
    if workers == 0 {
        bail!("TF_CONFIG has no cluster.worker or cluster.chief entries");
    }
    for kind in c.cluster.keys() {
        if !["ps", "worker", "chief"].contains(&kind.as_str()) {
            bail!("TF_CONFIG cluster has `{kind}` tasks; quorum knows ps, chief and worker");
        }
    }
    let role = match c.task.kind.as_str() {
        "ps" if (c.task.index as usize) < ps.len() => Role::Ps(c.task.index),
        "ps" => bail!("TF_CONFIG task is ps {} but cluster.ps has {} entries", c.task.index, ps.len()),
        "chief" => Role::Worker(0),
        "worker" if chiefs + c.task.index < workers => Role::Worker(chiefs + c.task.index),
        "worker" => {
            bail!("TF_CONFIG task is worker {} but cluster.worker has {} entries", c.task.index, workers - chiefs)
        }
        other => bail!("TF_CONFIG task type `{other}` is not one quorum runs (ps, chief, worker)"),
    };
    Ok(Topology { role, ps, workers, source: "TF_CONFIG" })
}

/// Expands a Slurm host list such as `node[01-03,07],login1` into host names.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>> {
    let mut hosts = Vec::new();
    let mut rest = list.trim();
    while !rest.is_empty() {
        // One item: a prefix, optionally followed by one bracketed range list, up to a top-level comma.
        let end = {
            let mut depth = 0;
            let mut end = rest.len();
            for (i, ch) in rest.char_indices() {
                match ch {
                    '[' => depth += 1,
                    ']' => depth -= 1,
                    ',' if depth == 0 => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            end
        };
        let item = &rest[..end];
        rest = rest[end..].trim_start_matches(',');
        match item.split_once('[') {
            None => hosts.push(item.to_string()),
            Some((prefix, ranges)) => {
                let (ranges, suffix) =
                    ranges.split_once(']').with_context(|| format!("unclosed `[` in Slurm host list `{list}`"))?;
                for r in ranges.split(',') {
                    let (a, b) = r.split_once('-').unwrap_or((r, r));
                    let width = a.len();
                    let (lo, hi): (u64, u64) = (
                        a.parse().with_context(|| format!("bad range `{r}` in Slurm host list `{list}`"))?,
                        b.parse().with_context(|| format!("bad range `{r}` in Slurm host list `{list}`"))?,
                    );
                    if hi < lo {
                        bail!("empty range `{r}` in Slurm host list `{list}`");
                    }
                    for n in lo..=hi {
                        hosts.push(format!("{prefix}{n:0width$}{suffix}"));
                    }
                }
            }
        }
    }
    Ok(hosts)
}

/// Reads Slurm's variables (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_STEP_NODELIST` or
/// `SLURM_JOB_NODELIST`): task 0 is the parameter server on the first node, listening on
/// `port`; task k is worker k − 1.
pub fn from_slurm(env: impl Fn(&str) -> Option<String>, port: u16) -> Result<Option<Topology>> {
    let Some(procid) = env("SLURM_PROCID") else { return Ok(None) };
    let procid: u32 = procid.parse().with_context(|| format!("SLURM_PROCID `{procid}` is not a number"))?;
    let ntasks: u32 = env("SLURM_NTASKS")
        .context("SLURM_PROCID is set but SLURM_NTASKS is not; run under srun")?
        .parse()
        .context("SLURM_NTASKS is not a number")?;
    if ntasks < 2 {
        bail!("Slurm gave {ntasks} task(s); quorum needs one for the parameter server and at least one worker");
    }
    let nodes = env("SLURM_STEP_NODELIST")
        .or_else(|| env("SLURM_JOB_NODELIST"))
        .context("neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set")?;
    let first = expand_hostlist(&nodes)?.into_iter().next().context("the Slurm node list is empty")?;
    let role = if procid == 0 { Role::Ps(0) } else { Role::Worker(procid - 1) };
    Ok(Some(Topology { role, ps: vec![format!("{first}:{port}")], workers: ntasks - 1, source: "Slurm" }))
}

/// The topology from the environment: `TF_CONFIG` first, then Slurm; `None` when neither is set.
pub fn from_env(port: u16) -> Result<Option<Topology>> {
    if let Ok(tf) = std::env::var("TF_CONFIG") {
        return from_tf_config(&tf).map(Some);
    }
    from_slurm(|k| std::env::var(k).ok(), port)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TF: &str = r#"{"cluster": {"chief": ["c0:2222"], "worker": ["w0:2222", "w1:2222"], "ps": ["ps0:7070"]},
                         "task": {"type": "worker", "index": 1}}"#;

    #[test]
    fn tf_config_puts_the_chief_first_and_workers_after_it() {
        let t = from_tf_config(TF).unwrap();
        assert_eq!(t, Topology { role: Role::Worker(2), ps: vec!["ps0:7070".into()], workers: 3, source: "TF_CONFIG" });
        let chief = from_tf_config(&TF.replace(r#""type": "worker", "index": 1"#, r#""type": "chief", "index": 0"#));
        assert_eq!(chief.unwrap().role, Role::Worker(0));
        let ps = from_tf_config(&TF.replace(r#""type": "worker", "index": 1"#, r#""type": "ps", "index": 0"#));
        assert_eq!(ps.unwrap().role, Role::Ps(0));
    }

    #[test]
    fn several_ps_entries_are_the_shards_of_a_sharded_run() {
        let three = TF.replace(r#"["ps0:7070"]"#, r#"["ps0:7070", "ps1:7070", "ps2:7070"]"#);
        let t =
            from_tf_config(&three.replace(r#""type": "worker", "index": 1"#, r#""type": "ps", "index": 2"#)).unwrap();
        assert_eq!(t.role, Role::Ps(2));
        assert_eq!(t.ps, ["ps0:7070", "ps1:7070", "ps2:7070"]);
        assert!(t.to_string().contains("shard 2 of 3"), "{t}");
        let worker = from_tf_config(&three).unwrap();
        assert_eq!((worker.role, worker.ps.len()), (Role::Worker(2), 3));
        let beyond = three.replace(r#""type": "worker", "index": 1"#, r#""type": "ps", "index": 3"#);
        assert!(from_tf_config(&beyond).unwrap_err().to_string().contains("cluster.ps has 3 entries"));
    }

    #[test]
    fn tf_config_errors_name_the_problem() {
        let no_ps = TF.replace(r#", "ps": ["ps0:7070"]"#, "");
        assert!(from_tf_config(&no_ps).unwrap_err().to_string().contains("no cluster.ps"));
        let out_of_range = TF.replace(r#""index": 1"#, r#""index": 5"#);
        assert!(from_tf_config(&out_of_range).unwrap_err().to_string().contains("has 2 entries"));
        let evaluator = TF.replace(r#""type": "worker""#, r#""type": "evaluator""#);
        assert!(from_tf_config(&evaluator).unwrap_err().to_string().contains("evaluator"));
        assert!(format!("{:#}", from_tf_config("{").unwrap_err()).contains("TF_CONFIG is not valid"));
    }

    #[test]
    fn slurm_host_lists_expand_with_padding() {
        assert_eq!(
            expand_hostlist("node[01-03,07],login1").unwrap(),
            ["node01", "node02", "node03", "node07", "login1"]
        );
        assert_eq!(expand_hostlist("a1").unwrap(), ["a1"]);
        assert_eq!(expand_hostlist("gpu[9-10]-ib").unwrap(), ["gpu9-ib", "gpu10-ib"]);
        assert!(expand_hostlist("node[1-").is_err());
    }

    #[test]
    fn slurm_task_zero_is_the_server_and_the_rest_are_workers() {
        let env = |procid: &'static str| {
            move |k: &str| match k {
                "SLURM_PROCID" => Some(procid.to_string()),
                "SLURM_NTASKS" => Some("5".to_string()),
                "SLURM_JOB_NODELIST" => Some("n[3-4]".to_string()),
                _ => None,
            }
        };
        let t = from_slurm(env("0"), 7070).unwrap().unwrap();
        assert_eq!(t, Topology { role: Role::Ps(0), ps: vec!["n3:7070".into()], workers: 4, source: "Slurm" });
        assert_eq!(from_slurm(env("3"), 7070).unwrap().unwrap().role, Role::Worker(2));
        assert_eq!(from_slurm(|_| None, 7070).unwrap(), None);
    }
}
