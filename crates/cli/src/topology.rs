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

/// Expands Slurm's tasks-per-node list such as `2(x3),1` into a count per node.
fn expand_tasks_per_node(list: &str) -> Result<Vec<u32>> {
    let mut counts = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let bad = || format!("bad entry `{part}` in Slurm's tasks per node `{list}`");
        let (n, times) = match part.split_once("(x") {
            Some((n, rest)) => (n, rest.strip_suffix(')').with_context(bad)?.parse::<usize>().with_context(bad)?),
            None => (part, 1),
        };
        let n: u32 = n.parse().with_context(bad)?;
        counts.extend(std::iter::repeat_n(n, times));
    }
    Ok(counts)
}

/// Reads Slurm's variables (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_STEP_NODELIST` or
/// `SLURM_JOB_NODELIST`): tasks 0..`shards` are the parameter servers (shard k on task k's
/// node, listening on `port` + k, so that shards sharing a node do not collide), the tasks
/// after them the workers. With more than one shard the nodes of the shards come from
/// `SLURM_STEP_TASKS_PER_NODE` (or `SLURM_TASKS_PER_NODE`) under Slurm's default block
/// distribution; a shard that finds itself elsewhere (`SLURMD_NODENAME`) says so.
pub fn from_slurm(env: impl Fn(&str) -> Option<String>, port: u16, shards: u32) -> Result<Option<Topology>> {
    let Some(procid) = env("SLURM_PROCID") else { return Ok(None) };
    let procid: u32 = procid.parse().with_context(|| format!("SLURM_PROCID `{procid}` is not a number"))?;
    let ntasks: u32 = env("SLURM_NTASKS")
        .context("SLURM_PROCID is set but SLURM_NTASKS is not; run under srun")?
        .parse()
        .context("SLURM_NTASKS is not a number")?;
    let shards = shards.max(1);
    if ntasks <= shards {
        bail!(
            "Slurm gave {ntasks} task(s); quorum needs {shards} for the parameter server(s) (shards = {shards}) and at \
             least one worker: srun -n {} or more",
            shards + 1
        );
    }
    let nodes = env("SLURM_STEP_NODELIST")
        .or_else(|| env("SLURM_JOB_NODELIST"))
        .context("neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set")?;
    let hosts = expand_hostlist(&nodes)?;
    let first = hosts.first().context("the Slurm node list is empty")?;
    let ps = if shards == 1 {
        vec![format!("{first}:{port}")]
    } else {
        let per_node = env("SLURM_STEP_TASKS_PER_NODE").or_else(|| env("SLURM_TASKS_PER_NODE")).context(
            "a sharded run under Slurm needs SLURM_STEP_TASKS_PER_NODE (or SLURM_TASKS_PER_NODE) to find each \
             shard's node; run under srun",
        )?;
        let counts = expand_tasks_per_node(&per_node)?;
        // Block distribution: each node's tasks in turn.
        let node_of_task: Vec<&String> =
            hosts.iter().zip(&counts).flat_map(|(h, &n)| std::iter::repeat_n(h, n as usize)).collect();
        (0..shards)
            .map(|k| {
                let host = node_of_task.get(k as usize).with_context(|| {
                    format!("Slurm's tasks per node `{per_node}` on nodes `{nodes}` place no task {k}")
                })?;
                Ok(format!("{host}:{}", u32::from(port) + k))
            })
            .collect::<Result<Vec<_>>>()?
    };
    if procid < shards {
        if let (Some(me), Some(planned)) = (env("SLURMD_NODENAME"), ps[procid as usize].rsplit_once(':')) {
            if me != planned.0 {
                bail!(
                    "this is shard {procid}, on node {me}, but under Slurm's block distribution task {procid} runs on \
                     {}: run srun with --distribution=block (the default), or start the shards with quorum ps --shard \
                     and the workers with --ps",
                    planned.0
                );
            }
        }
    }
    let role = if procid < shards { Role::Ps(procid) } else { Role::Worker(procid - shards) };
    Ok(Some(Topology { role, ps, workers: ntasks - shards, source: "Slurm" }))
}

/// The topology from the environment: `TF_CONFIG` first, then Slurm (with `shards`
/// servers); `None` when neither is set.
pub fn from_env(port: u16, shards: u32) -> Result<Option<Topology>> {
    if let Ok(tf) = std::env::var("TF_CONFIG") {
        return from_tf_config(&tf).map(Some);
    }
    from_slurm(|k| std::env::var(k).ok(), port, shards)
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
        let t = from_slurm(env("0"), 7070, 1).unwrap().unwrap();
        assert_eq!(t, Topology { role: Role::Ps(0), ps: vec!["n3:7070".into()], workers: 4, source: "Slurm" });
        assert_eq!(from_slurm(env("3"), 7070, 1).unwrap().unwrap().role, Role::Worker(2));
        assert_eq!(from_slurm(|_| None, 7070, 1).unwrap(), None);
    }

    #[test]
    fn slurm_tasks_zero_to_s_are_the_shards_on_their_block_nodes_each_on_its_own_port() {
        // 7 tasks, 2 on each of n3 and n4 and 3 on n5: with 3 shards, tasks 0 and 1 are on
        // n3 and task 2 on n4; tasks 3..6 are workers 0..3.
        let env = |procid: &'static str, node: &'static str| {
            move |k: &str| match k {
                "SLURM_PROCID" => Some(procid.to_string()),
                "SLURM_NTASKS" => Some("7".to_string()),
                "SLURM_JOB_NODELIST" => Some("n[3-5]".to_string()),
                "SLURM_TASKS_PER_NODE" => Some("2(x2),3".to_string()),
                "SLURMD_NODENAME" => Some(node.to_string()),
                _ => None,
            }
        };
        let t = from_slurm(env("2", "n4"), 7070, 3).unwrap().unwrap();
        assert_eq!(t.ps, ["n3:7070", "n3:7071", "n4:7072"]);
        assert_eq!((t.role, t.workers), (Role::Ps(2), 4));
        assert_eq!(from_slurm(env("3", "n4"), 7070, 3).unwrap().unwrap().role, Role::Worker(0));
        // A shard placed elsewhere (cyclic distribution) is told what to do.
        let e = from_slurm(env("1", "n4"), 7070, 3).unwrap_err().to_string();
        assert!(e.contains("task 1 runs on n3") && e.contains("--distribution=block"), "{e}");
        let e = from_slurm(env("1", "n3"), 7070, 7).unwrap_err().to_string();
        assert!(e.contains("srun -n 8 or more"), "{e}");
        assert_eq!(expand_tasks_per_node("2(x3),1").unwrap(), [2, 2, 2, 1]);
        assert!(expand_tasks_per_node("2(x").is_err());
    }
}
