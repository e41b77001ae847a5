//! The view's file tree, worked out once from the plan: every folder and
//! file a view holds, by its path relative to the view's root. `export`
//! writes exactly these entries and a mount shows exactly these (plus its
//! `.reshardfs/` folder), so "export writes the tree a mount shows" holds
//! by construction.
//!
//! The rules: a checkpoint root shows its tracker and one folder per
//! iteration; an iteration or plain source shows its files at the root.
//! Each iteration holds its view files, then its small files
//! (`metadata.json`, `common.json`; or a Hugging Face view's index,
//! `config.json` and the files shown beside the weights).

use std::path::{Path, PathBuf};

use crate::checkpoint::names;
use crate::checkpoint::source::SourceKind;
use crate::reshard::plan::Plan;

/// One folder or file of a view.
#[derive(Debug)]
pub struct Entry<'p> {
    /// Relative to the view's root; never empty.
    pub path: PathBuf,
    pub content: Content<'p>,
    /// The source file or folder whose modification time the entry shows.
    pub time_of: PathBuf,
}

#[derive(Debug)]
pub enum Content<'p> {
    Dir,
    /// View file `file` of iteration `it` (`Plan::iterations[it].files[file]`).
    View {
        it: usize,
        file: usize,
    },
    /// Bytes fixed by the plan: the tracker, metadata.json, an index...
    Bytes(&'p [u8]),
}

impl Entry<'_> {
    /// The checkpoint root's tracker, which names the latest iteration: a
    /// writer puts it down last, once every iteration it could name is
    /// complete.
    pub fn is_tracker(&self) -> bool {
        self.path == Path::new(names::TRACKER)
    }
}

impl Plan {
    /// Every entry of the view, each folder before what it holds, the
    /// tracker (if any) last.
    pub fn entries(&self) -> Vec<Entry<'_>> {
        let mut out = Vec::new();
        let root_source = matches!(self.source.kind, SourceKind::Root { .. });
        for (i, (ip, it)) in self
            .iterations
            .iter()
            .zip(&self.source.iterations)
            .enumerate()
        {
            let dir = match &it.name {
                Some(n) if root_source => {
                    out.push(Entry {
                        path: PathBuf::from(n),
                        content: Content::Dir,
                        time_of: it.dir.clone(),
                    });
                    PathBuf::from(n)
                }
                _ => PathBuf::new(),
            };
            for (fi, vf) in ip.files.iter().enumerate() {
                out.push(Entry {
                    path: dir.join(&vf.name),
                    content: Content::View { it: i, file: fi },
                    time_of: it.dir.clone(),
                });
            }
            for (name, bytes) in &ip.small {
                // common.json passes through: it shows its own time.
                let time_of = match name.as_str() {
                    names::COMMON => it.dir.join(names::COMMON),
                    _ => it.dir.clone(),
                };
                out.push(Entry {
                    path: dir.join(name),
                    content: Content::Bytes(bytes),
                    time_of,
                });
            }
        }
        if let Some(tracker) = self.tracker() {
            out.push(Entry {
                path: PathBuf::from(names::TRACKER),
                content: Content::Bytes(tracker),
                time_of: self.source.path.join(names::TRACKER),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::source::Source;
    use crate::reshard::target::TargetSpec;

    fn entries(src: &str, spec: TargetSpec) -> Vec<(String, &'static str)> {
        let plan = Plan::build(Source::open(Path::new(src)).unwrap(), spec).unwrap();
        plan.entries()
            .iter()
            .map(|e| {
                let kind = match e.content {
                    Content::Dir => "dir",
                    Content::View { .. } => "view",
                    Content::Bytes(_) => "bytes",
                };
                (e.path.display().to_string(), kind)
            })
            .collect()
    }

    #[test]
    fn a_root_has_its_iterations_and_the_tracker_last() {
        let got = entries(
            "tests/fixtures/tp4-f32",
            TargetSpec::Mesh {
                sizes: vec![("tp".into(), 2)],
                pp: None,
                offset: None,
            },
        );
        let it = "iteration_00000005";
        // Hand-written: the tree MindSpore writes for a tp=2 save.
        let want = vec![
            (it.to_string(), "dir"),
            (format!("{it}/model-0000000-0000002.safetensors"), "view"),
            (format!("{it}/model-0000001-0000002.safetensors"), "view"),
            (format!("{it}/metadata.json"), "bytes"),
            (format!("{it}/common.json"), "bytes"),
            ("latest_checkpointed_iteration.txt".to_string(), "bytes"),
        ];
        assert_eq!(got, want);
    }

    /// Each entry shows the modification time of what it comes from:
    /// common.json passes through, so its own file's; the tracker its own;
    /// the rest their iteration folder's. Only the tracker is the tracker.
    #[test]
    fn entries_show_their_sources_time_and_only_the_tracker_is_one() {
        let root = Path::new("tests/fixtures/tp4-f32");
        let spec = TargetSpec::Mesh {
            sizes: vec![("tp".into(), 2)],
            pp: None,
            offset: None,
        };
        let plan = Plan::build(Source::open(root).unwrap(), spec).unwrap();
        // The source keeps its path absolute.
        let root = &root.canonicalize().unwrap();
        let got: Vec<(String, PathBuf, bool)> = plan
            .entries()
            .iter()
            .map(|e| {
                (
                    e.path.display().to_string(),
                    e.time_of.clone(),
                    e.is_tracker(),
                )
            })
            .collect();
        let it = "iteration_00000005";
        let dir = root.join(it);
        let tracker = "latest_checkpointed_iteration.txt";
        let want = vec![
            (it.to_string(), dir.clone(), false),
            (
                format!("{it}/model-0000000-0000002.safetensors"),
                dir.clone(),
                false,
            ),
            (
                format!("{it}/model-0000001-0000002.safetensors"),
                dir.clone(),
                false,
            ),
            (format!("{it}/metadata.json"), dir.clone(), false),
            (format!("{it}/common.json"), dir.join("common.json"), false),
            (tracker.to_string(), root.join(tracker), true),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn an_iteration_folder_has_its_files_at_the_root() {
        let got = entries(
            "tests/fixtures/gpt-dp2-tp2-pp2-bf16/iteration_00000001",
            TargetSpec::Unshard,
        );
        let want = vec![
            ("gpt-model-0000000-0000001.safetensors".to_string(), "view"),
            ("gpt-opt-0000000-0000001.safetensors".to_string(), "view"),
            ("metadata.json".to_string(), "bytes"),
            ("common.json".to_string(), "bytes"),
        ];
        assert_eq!(got, want);
    }
}
