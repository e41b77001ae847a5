//! A source file truncated under a live plan must turn reads into errors,
//! not kill the process with SIGBUS and not serve zeros.

use std::fs;
use std::path::Path;

use reshardfs::checkpoint::source::Source;
use reshardfs::reshard::engine::Engine;
use reshardfs::reshard::plan::Plan;
use reshardfs::reshard::target::TargetSpec;

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// Plans the identity view of a copy of tp4-f32, reads every file, applies
/// `change` to rank 3's source file, and checks that exactly the reads that
/// need that file fail (naming it) while the others return the same bytes.
fn check_change(change: impl FnOnce(&Path)) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ckpt");
    copy_dir(Path::new("tests/fixtures/tp4-f32"), &root);
    // Identity view: view rank r reads its slices from source rank r (and
    // replicated tensors from rank 0).
    let spec = TargetSpec::Mesh {
        sizes: vec![("tp".into(), 4)],
        pp: None,
        offset: None,
    };
    let plan = Plan::build(Source::open(&root).unwrap(), spec).unwrap();
    let engine = Engine::new(&plan);
    let files = &plan.iterations[0].files;
    let mut before = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let mut buf = vec![0u8; f.size as usize];
        engine.read(0, i, 0, &mut buf).unwrap();
        before.push(buf);
    }

    change(&root.join("iteration_00000005/model-0000003-0000004.safetensors"));

    for (i, f) in files.iter().enumerate() {
        let mut buf = vec![0u8; f.size as usize];
        let r = engine.read(0, i, 0, &mut buf);
        if f.rank == 3 {
            let e = r.expect_err("a read that needs the changed file must fail");
            assert!(
                e.to_string().contains("model-0000003-0000004.safetensors"),
                "{e}"
            );
        } else {
            r.unwrap();
            assert_eq!(buf, before[i], "{} changed", f.name);
        }
    }
    // The generated header of the affected file still reads.
    let hlen = files[3].header.len();
    let mut head = vec![0u8; hlen];
    engine.read(0, 3, 0, &mut head).unwrap();
    assert_eq!(head[..], before[3][..hlen]);
}

#[test]
fn truncated_source_fails_only_the_reads_that_need_it() {
    check_change(|p| {
        let len = fs::metadata(p).unwrap().len();
        let f = fs::OpenOptions::new().write(true).open(p).unwrap();
        f.set_len(len / 2).unwrap();
    });
}

#[test]
fn deleted_source_fails_only_the_reads_that_need_it() {
    check_change(|p| fs::remove_file(p).unwrap());
}

#[test]
fn replaced_source_fails_only_the_reads_that_need_it() {
    // A new save renamed over the old file: same name, same size, other inode.
    check_change(|p| {
        let new = p.with_extension("new");
        fs::copy(p, &new).unwrap();
        fs::rename(&new, p).unwrap();
    });
}

#[test]
fn source_rewritten_in_place_fails_only_the_reads_that_need_it() {
    check_change(|p| {
        let f = fs::OpenOptions::new().write(true).open(p).unwrap();
        let later =
            fs::metadata(p).unwrap().modified().unwrap() + std::time::Duration::from_secs(5);
        f.set_modified(later).unwrap();
    });
}
