//! State files: save, load into a fresh optimizer, continue bitwise; every refusal leaves the
//! optimizer untouched; atomic saves; mutated files never panic the loader.

use crate::common::*;
use fusedopt::*;
use std::path::{Path, PathBuf};

const LENS: [usize; 4] = [300, 0, 17, 4097];

/// A fresh directory for one test.
fn dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fusedopt-state-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn step(opt: &mut dyn Optimizer, ws: &mut [Vec<f32>], rng: &mut Rng) {
    let gs: Vec<Vec<f32>> = ws.iter().map(|w| rng.vec(w.len(), 2.0)).collect();
    opt.step_all(ws, &gs).unwrap();
}

fn adam() -> Box<dyn Optimizer> {
    Box::new(Adam::new(AdamConfig::default()))
}

/// Builds an optimizer.
type Build = Box<dyn Fn() -> Box<dyn Optimizer>>;

/// Every optimizer, some with options, groups and AMSGrad, as (label, builder).
fn variants() -> Vec<(String, Build)> {
    let mut v: Vec<(String, Build)> = configs()
        .into_iter()
        .map(|c| {
            let config = with(unusual(c), "weight_decay=0.01");
            let build: Build = Box::new(move || config.build());
            (c.name().to_string(), build)
        })
        .collect();
    v.push((
        "AdamW+AMSGrad+groups".into(),
        Box::new(|| {
            let mut o = Adam::new(AdamConfig {
                amsgrad: true,
                ..AdamConfig::adamw()
            });
            o.set_param_groups(&GROUPS).unwrap();
            Box::new(o)
        }),
    ));
    v
}

#[test]
fn save_load_continue_is_bitwise_identical_to_the_uninterrupted_run() {
    let d = dir("roundtrip");
    for (label, build) in variants() {
        for lens in [&LENS[..], &[1031][..]] {
            if label.contains("groups") && lens.len() != LENS.len() {
                continue; // its groups are for LENS
            }
            let mut rng = Rng(1);
            let w0: Vec<Vec<f32>> = lens.iter().map(|&n| rng.vec(n, 1.0)).collect();
            // The uninterrupted run.
            let mut straight = build();
            let mut ws = w0.clone();
            let mut r = Rng(2);
            for _ in 0..7 {
                step(straight.as_mut(), &mut ws, &mut r);
            }
            // Three steps, save, load into a fresh optimizer of the default configuration (the
            // file carries the hyperparameters and groups), four more steps.
            let mut first = build();
            let mut wr = w0.clone();
            let mut r = Rng(2);
            for _ in 0..3 {
                step(first.as_mut(), &mut wr, &mut r);
            }
            let path = d.join(format!("{label}-{}.safetensors", lens.len()));
            first.save_state(&path).unwrap();
            let mut resumed = optimizer_by_name(first.name()).unwrap();
            resumed.load_state(&path).unwrap();
            assert_eq!(resumed.steps(), 3, "{label}");
            assert_eq!(resumed.layout(), Some(lens), "{label}");
            assert_eq!(resumed.param_groups(), first.param_groups(), "{label}");
            assert_eq!(resumed.lr(), first.lr(), "{label}");
            for _ in 0..4 {
                step(resumed.as_mut(), &mut wr, &mut r);
            }
            assert_eq!(resumed.steps(), straight.steps());
            for (t, (a, b)) in wr.iter().zip(&ws).enumerate() {
                assert_same(
                    a,
                    b,
                    &format!("{label}, {} tensors, tensor {t}", lens.len()),
                );
            }
        }
    }
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn a_state_saved_before_any_step_loads_into_a_fresh_optimizer() {
    let d = dir("fresh");
    let path = d.join("fresh.safetensors");
    let opt = Momentum::new(MomentumConfig {
        lr: 0.5,
        ..Default::default()
    });
    opt.save_state(&path).unwrap();
    let mut resumed = Momentum::new(MomentumConfig::default());
    resumed.load_state(&path).unwrap();
    assert_eq!(
        (resumed.steps(), resumed.layout(), resumed.lr()),
        (0, None, 0.5)
    );
    resumed.step(&mut [1.0; 5], &[1.0; 5]).unwrap();
    std::fs::remove_dir_all(d).unwrap();
}

/// An Adam that has taken two steps on LENS, and a copy of what it would do next.
fn stepped() -> (Box<dyn Optimizer>, Vec<Vec<f32>>) {
    let mut opt = adam();
    let mut rng = Rng(3);
    let mut ws: Vec<Vec<f32>> = LENS.iter().map(|&n| rng.vec(n, 1.0)).collect();
    step(opt.as_mut(), &mut ws, &mut rng);
    step(opt.as_mut(), &mut ws, &mut rng);
    (opt, ws)
}

/// Checks that `opt` still behaves exactly as a `stepped()` optimizer does.
fn assert_untouched(opt: &mut dyn Optimizer, ws: &[Vec<f32>], what: &str) {
    let (mut control, _) = stepped();
    assert_eq!(opt.steps(), 2, "{what}");
    assert_eq!(opt.layout(), Some(&LENS[..]), "{what}");
    let (mut a, mut b) = (ws.to_vec(), ws.to_vec());
    step(opt, &mut a, &mut Rng(4));
    step(control.as_mut(), &mut b, &mut Rng(4));
    for (x, y) in a.iter().zip(&b) {
        assert_same(x, y, what);
    }
}

#[test]
fn refused_files_leave_the_optimizer_untouched() {
    let d = dir("refused");
    let (source, _) = stepped();
    let good = d.join("good.safetensors");
    source.save_state(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let write = |name: &str, data: &[u8]| {
        let p = d.join(name);
        std::fs::write(&p, data).unwrap();
        p
    };

    let mut other_kind = d.join("momentum.safetensors");
    let mut m = Momentum::new(MomentumConfig::default());
    step(
        &mut m,
        &mut LENS.iter().map(|&n| vec![0.0; n]).collect::<Vec<_>>(),
        &mut Rng(5),
    );
    m.save_state(&other_kind).unwrap();
    let mut other_layout = d.join("layout.safetensors");
    let mut a = adam();
    a.step(&mut [0.0; 9], &[1.0; 9]).unwrap();
    a.save_state(&other_layout).unwrap();

    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut flipped_data = bytes.clone();
    *flipped_data.last_mut().unwrap() ^= 0x01;
    let mut flipped_meta = bytes.clone();
    let text = String::from_utf8_lossy(&bytes[8..8 + header_len]).into_owned();
    let at = 8 + text.find("\"steps\":\"2\"").expect("steps entry") + "\"steps\":\"".len();
    flipped_meta[at] = b'7';
    let mut version = bytes.clone();
    let at = 8 + text.find("\"format_version\":\"2\"").unwrap() + "\"format_version\":\"".len();
    version[at] = b'9';

    type Case<'a> = (&'a str, PathBuf, fn(&StateError) -> bool);
    let cases: Vec<Case> = vec![
        (
            "another optimizer",
            std::mem::take(&mut other_kind),
            |e| matches!(e, StateError::Optimizer { found, .. } if found == "momentum"),
        ),
        (
            "another layout",
            std::mem::take(&mut other_layout),
            |e| matches!(e, StateError::Layout { found: Some(f), .. } if f == &[9]),
        ),
        (
            "truncated",
            write("truncated", &bytes[..bytes.len() - 4]),
            |e| matches!(e, StateError::Format { .. }),
        ),
        ("a data byte altered", write("data", &flipped_data), |e| {
            matches!(e, StateError::Checksum { .. })
        }),
        (
            "the step count altered",
            write("meta", &flipped_meta),
            |e| matches!(e, StateError::Checksum { .. }),
        ),
        (
            "another version",
            write("version", &version),
            |e| matches!(e, StateError::Version { found, .. } if found == "9"),
        ),
        (
            "garbage",
            write("garbage", b"definitely not a state file"),
            |e| matches!(e, StateError::Format { .. }),
        ),
        ("empty", write("empty", b""), |e| {
            matches!(e, StateError::Format { .. })
        }),
        ("missing", d.join("does-not-exist"), |e| {
            matches!(e, StateError::Io { op: "read", .. })
        }),
    ];
    for (what, path, expected) in cases {
        let (mut opt, ws) = stepped();
        let err = opt.load_state(&path).unwrap_err();
        assert!(expected(&err), "{what}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{what}: {msg}");
        assert_untouched(opt.as_mut(), &ws, what);
    }
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn out_of_range_hyperparameters_in_a_file_are_refused() {
    let d = dir("config");
    let path = d.join("bad-lr.safetensors");
    let mut opt = Sgd::new(SgdConfig {
        lr: -1.0,
        ..Default::default()
    });
    opt.save_state(&path).unwrap(); // saving is fine; stepping would refuse it
    opt.config_mut().lr = 0.1;
    let err = opt.load_state(&path).unwrap_err();
    assert!(
        matches!(
            err,
            StateError::Config {
                error: StepError::InvalidConfig { field: "lr", .. },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(opt.config().lr, 0.1);
    std::fs::remove_dir_all(d).unwrap();
}

fn leftovers(d: &Path) -> Vec<String> {
    std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

#[test]
fn saves_are_atomic_and_a_failed_save_keeps_the_previous_file() {
    let d = dir("atomic");
    let path = d.join("state.safetensors");
    let (opt, _) = stepped();
    opt.save_state(&path).unwrap();
    let before = std::fs::read(&path).unwrap();

    // Overwriting: the new contents replace the old ones whole.
    let mut more = adam();
    more.load_state(&path).unwrap();
    let mut ws: Vec<Vec<f32>> = LENS.iter().map(|&n| vec![0.5; n]).collect();
    step(more.as_mut(), &mut ws, &mut Rng(6));
    more.save_state(&path).unwrap();
    let mut check = adam();
    check.load_state(&path).unwrap();
    assert_eq!(check.steps(), 3);
    assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));

    // A save whose rename fails (the destination is a directory): an error naming the path,
    // the destination untouched, no temporary file left behind.
    let blocked = d.join("blocked");
    std::fs::create_dir(&blocked).unwrap();
    std::fs::write(blocked.join("keep"), b"x").unwrap();
    let err = opt.save_state(&blocked).unwrap_err();
    assert!(matches!(err, StateError::Io { op: "rename", .. }), "{err}");
    assert_eq!(std::fs::read(blocked.join("keep")).unwrap(), b"x");
    assert!(leftovers(&d).is_empty());

    // A save into a directory that does not exist fails cleanly too.
    let err = opt
        .save_state(&d.join("missing").join("x.safetensors"))
        .unwrap_err();
    assert!(matches!(err, StateError::Io { op: "write", .. }), "{err}");

    // The earlier good file still loads.
    std::fs::write(&path, &before).unwrap();
    adam().load_state(&path).unwrap();
    std::fs::remove_dir_all(d).unwrap();
}

/// Property test: thousands of mutated state files (bit flips, truncations, insertions,
/// deletions, header scribbles). The loader must never panic; it must refuse every file that
/// differs in meaning from the original and leave the optimizer untouched, and a file it
/// accepts must give exactly the original state.
#[test]
fn mutated_files_never_panic_and_never_half_load() {
    let d = dir("fuzz");
    let (source, _) = {
        // Small tensors keep the file short, so mutations often hit the header.
        let mut opt = adam();
        let mut ws = vec![vec![0.25f32; 5], vec![1.0f32; 3]];
        step(opt.as_mut(), &mut ws, &mut Rng(7));
        (opt, ws)
    };
    let good = d.join("good.safetensors");
    source.save_state(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let path = d.join("mutant.safetensors");
    let mut rng = Rng(8);
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..3000 {
        let mut m = bytes.clone();
        let pick = |rng: &mut Rng, n: usize| (rng.next_u64() % n.max(1) as u64) as usize;
        match i % 6 {
            0 => {
                for _ in 0..1 + pick(&mut rng, 4) {
                    let at = pick(&mut rng, m.len());
                    m[at] ^= 1 << pick(&mut rng, 8);
                }
            }
            1 => m.truncate(pick(&mut rng, m.len())),
            2 => {
                let at = pick(&mut rng, m.len());
                m.insert(at, rng.next_u64() as u8);
            }
            3 => {
                let at = pick(&mut rng, m.len());
                m.remove(at);
            }
            4 => {
                // Scribble printable characters into the JSON header.
                let header = u64::from_le_bytes(m[..8].try_into().unwrap()) as usize;
                let at = 8 + pick(&mut rng, header);
                m[at] = b" ,:{}\"[]0123456789abcdefz-."[pick(&mut rng, 27)];
            }
            _ => {
                // Random bytes, sometimes behind a plausible length prefix.
                let n = pick(&mut rng, 300);
                m = (0..n).map(|_| rng.next_u64() as u8).collect();
                if n >= 8 && rng.next_u64().is_multiple_of(2) {
                    m[..8].copy_from_slice(&((n - 8) as u64).to_le_bytes());
                }
            }
        }
        if m == bytes {
            continue;
        }
        std::fs::write(&path, &m).unwrap();
        let mut fresh = adam();
        match fresh.load_state(&path) {
            Ok(()) => {
                // Only a change without meaning (JSON whitespace, say) may load, and then it
                // must load exactly the original state.
                accepted += 1;
                let mut original = adam();
                original.load_state(&good).unwrap();
                let mut a = vec![vec![0.5f32; 5], vec![0.5f32; 3]];
                let mut b = a.clone();
                step(fresh.as_mut(), &mut a, &mut Rng(9));
                step(original.as_mut(), &mut b, &mut Rng(9));
                assert_eq!(a, b, "mutation {i} loaded a different state");
            }
            Err(e) => {
                refused += 1;
                assert!(!e.to_string().is_empty());
                assert_eq!(
                    (fresh.steps(), fresh.layout()),
                    (0, None),
                    "mutation {i}: {e}"
                );
            }
        }
    }
    println!("mutated files: {refused} refused, {accepted} accepted unchanged in meaning");
    assert!(refused > 2500);
    std::fs::remove_dir_all(d).unwrap();
}

/// Rewrites the metadata of the state file at `from` with `edit` and a checksum computed as the
/// format documents it, so that only the checks behind the checksum can refuse it.
fn crafted(from: &Path, to: &Path, edit: impl Fn(&mut std::collections::HashMap<String, String>)) {
    let bytes = std::fs::read(from).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    // Tensors in buffer then tensor order: `<buffer>.<tensor>` (as saved; an edit of `buffers`
    // does not rename them).
    let buffers: Vec<String> = meta["buffers"]
        .split(',')
        .filter(|b| !b.is_empty())
        .map(str::to_string)
        .collect();
    let tensors = file.len() / buffers.len().max(1);
    let names: Vec<String> = buffers
        .iter()
        .flat_map(|b| (0..tensors).map(move |t| format!("{b}.{t}")))
        .collect();
    edit(&mut meta);
    let mut hasher = crc32fast::Hasher::new();
    let mut keys: Vec<&String> = meta.keys().filter(|k| *k != "checksum").collect();
    keys.sort();
    for k in keys {
        hasher.update(format!("{k}={}\n", meta[k]).as_bytes());
    }
    let views: Vec<_> = names.iter().map(|n| file.tensor(n).unwrap()).collect();
    for (n, v) in names.iter().zip(&views) {
        hasher.update(n.as_bytes());
        hasher.update(b"\n");
        hasher.update(v.data());
    }
    meta.insert("checksum".into(), format!("{:08x}", hasher.finalize()));
    let data: Vec<(String, safetensors::tensor::TensorView)> =
        names.into_iter().zip(views).collect();
    safetensors::serialize_to_file(data, Some(meta), to).unwrap();
}

#[test]
fn files_with_a_valid_checksum_are_still_checked_for_sense() {
    let d = dir("crafted");
    let (source, _) = stepped();
    let good = d.join("good.safetensors");
    source.save_state(&good).unwrap();

    // The documented checksum recipe is the real one: an edited lr loads.
    let edited = d.join("edited.safetensors");
    crafted(&good, &edited, |m| {
        m.insert("config.lr".into(), "0.25".into());
    });
    let mut opt = adam();
    opt.load_state(&edited).unwrap();
    assert_eq!((opt.lr(), opt.steps()), (0.25, 2));

    type Edit = fn(&mut std::collections::HashMap<String, String>);
    let cases: [(&str, Edit); 6] = [
        ("no buffers after a step", |m| {
            m.insert("buffers".into(), String::new());
        }),
        ("a step count at the limit", |m| {
            m.insert("steps".into(), u64::MAX.to_string());
        }),
        ("an unreadable hyperparameter", |m| {
            m.insert("config.beta1".into(), "lots".into());
        }),
        ("an out-of-range hyperparameter", |m| {
            m.insert("config.beta1".into(), "1.5".into());
        }),
        ("groups for another tensor count", |m| {
            m.insert("groups".into(), "1/-".into());
        }),
        ("another optimizer's buffers", |m| {
            m.insert("buffers".into(), "h,v".into());
        }),
    ];
    for (what, edit) in cases {
        let path = d.join("bad.safetensors");
        crafted(&good, &path, edit);
        let (mut opt, ws) = stepped();
        let err = opt.load_state(&path).unwrap_err();
        assert!(
            matches!(err, StateError::Format { .. } | StateError::Config { .. }),
            "{what}: {err:?}"
        );
        assert_untouched(opt.as_mut(), &ws, what);
    }

    // SGD has no buffers to bound its layout: impossible lengths are refused, not wrapped.
    let sgd = d.join("sgd.safetensors");
    let mut s = Sgd::new(SgdConfig::default());
    s.step(&mut [0.0; 4], &[1.0; 4]).unwrap();
    s.save_state(&sgd).unwrap();
    let huge = d.join("huge.safetensors");
    crafted(&sgd, &huge, |m| {
        m.insert("layout".into(), format!("{},{}", usize::MAX, 16));
    });
    let mut fresh = Sgd::new(SgdConfig::default());
    let err = fresh.load_state(&huge).unwrap_err();
    assert!(matches!(err, StateError::Format { .. }), "{err:?}");
    assert_eq!(fresh.layout(), None);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn names_decide_what_loads_not_lengths_alone() {
    let d = dir("names");
    let names = ["wte", "h.0.ln.weight", "h.0.ln.bias", "lm_head"];
    let lens = [300usize, 17, 17, 4097];
    let mut rng = Rng(10);
    let mut ws: Vec<Vec<f32>> = lens.iter().map(|&n| rng.vec(n, 1.0)).collect();
    let mut opt = Adam::new(AdamConfig::default());
    opt.set_tensor_names(&names).unwrap();
    step(&mut opt, &mut ws, &mut rng);
    let path = d.join("named.safetensors");
    opt.save_state(&path).unwrap();

    // The same names load; an optimizer without names takes the file's.
    let mut same = Adam::new(AdamConfig::default());
    same.set_tensor_names(&names).unwrap();
    same.load_state(&path).unwrap();
    let mut unnamed = Adam::new(AdamConfig::default());
    unnamed.load_state(&path).unwrap();
    assert_eq!(unnamed.tensor_names(), names);

    // Two tensors of the same length listed the other way round: refused, naming the first.
    let mut swapped = Adam::new(AdamConfig::default());
    swapped
        .set_tensor_names(&["wte", "h.0.ln.bias", "h.0.ln.weight", "lm_head"])
        .unwrap();
    let err = swapped.load_state(&path).unwrap_err();
    match &err {
        StateError::Names {
            tensor: 1,
            expected,
            found: Some(found),
            ..
        } => assert_eq!(
            (expected.as_str(), found.as_str()),
            ("h.0.ln.bias", "h.0.ln.weight")
        ),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("h.0.ln.weight"), "{err}");
    assert_eq!((swapped.steps(), swapped.layout()), (0, None));

    // A file without names (written by version 1) does not load into a named optimizer.
    let old = d.join("v1.safetensors");
    crafted(&path, &old, |m| {
        m.insert("format_version".into(), "1".into());
        m.remove("names");
        m.remove("tensor_steps");
    });
    let err = same.load_state(&old).unwrap_err();
    assert!(
        matches!(
            err,
            StateError::Names {
                tensor: 0,
                found: None,
                ..
            }
        ),
        "{err:?}"
    );
    // ... but into an unnamed one, with every tensor at the file's step count.
    let mut plain = Adam::new(AdamConfig::default());
    plain.load_state(&old).unwrap();
    assert_eq!(
        (plain.tensor_steps(), plain.tensor_names().len()),
        (&[1, 1, 1, 1][..], 0)
    );
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn bad_names_are_refused_and_change_nothing() {
    let mut opt = Sgd::new(SgdConfig::default());
    for (names, tensor) in [
        (&["a", ""][..], 1),
        (&["a,b"][..], 0),
        (&["a", "b\n"][..], 1),
        (&["x", "y", "x"][..], 2),
    ] {
        let err = opt.set_tensor_names(names).unwrap_err();
        assert!(
            matches!(err, StepError::InvalidName { tensor: t, .. } if t == tensor),
            "{err}"
        );
        assert!(opt.tensor_names().is_empty());
    }
    opt.set_tensor_names(&["a", "b"]).unwrap();
    let mut w = [1.0f32; 3];
    let err = opt.step(&mut w, &[1.0; 3]).unwrap_err();
    assert_eq!(
        err,
        StepError::NameCount {
            names: 2,
            tensors: 1
        }
    );
    assert_eq!(w, [1.0; 3]);
    // Once a stateful optimizer has a layout, names for another tensor count are refused.
    let mut adam = Adam::new(AdamConfig::default());
    adam.step(&mut [0.0; 3], &[1.0; 3]).unwrap();
    assert!(matches!(
        adam.set_tensor_names(&["a", "b"]),
        Err(StepError::NameCount {
            names: 2,
            tensors: 1
        })
    ));
    adam.set_tensor_names(&["only"]).unwrap();
    adam.reset();
    assert_eq!(adam.tensor_names(), ["only"]);
}
