//! Replays the trace that `tests/test_capi.c` records (`test_capi --trace FILE`) through the Rust
//! API, and checks that every step made through the C ABI gave bitwise the Rust API's weights,
//! status and report, and that every state file the C program saved holds the Rust API's state.
//!
//! `scripts/test-capi.sh` builds the library, runs the C program and then this test with
//! `FUSEDOPT_CAPI_TRACE` set; without it the test is ignored.

use fusedopt::half::{bf16, f16};
use fusedopt::{
    Backend, Element, NonFinite, Optimizer, OptimizerConfig, OptimizerExt, ParamGroup, Settings,
    SimdLevel, StateFormat,
};
use std::collections::HashMap;
use std::path::Path;

/// The policy of a `fusedopt_non_finite`.
fn policy(code: i32) -> NonFinite {
    match code {
        0 => NonFinite::Propagate,
        1 => NonFinite::Skip,
        2 => NonFinite::Error,
        other => panic!("policy {other}"),
    }
}

/// Reads the trace's fields (in the byte order of the machine that wrote them: this one).
struct Reader {
    bytes: Vec<u8>,
    at: usize,
}

impl Reader {
    fn take(&mut self, n: usize) -> &[u8] {
        assert!(self.at + n <= self.bytes.len(), "the trace ends early");
        self.at += n;
        &self.bytes[self.at - n..self.at]
    }
    fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_ne_bytes(self.take(4).try_into().unwrap())
    }
    fn i32(&mut self) -> i32 {
        i32::from_ne_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_ne_bytes(self.take(8).try_into().unwrap())
    }
    fn f32(&mut self) -> f32 {
        f32::from_ne_bytes(self.take(4).try_into().unwrap())
    }
    fn string(&mut self) -> String {
        let n = self.u32() as usize;
        String::from_utf8(self.take(n).to_vec()).expect("UTF-8")
    }
}

/// An element type, to and from the trace's bytes.
trait Raw: Element {
    const SIZE: usize;
    fn from_bytes(b: &[u8]) -> Vec<Self>;
    fn to_bytes(v: &[Self]) -> Vec<u8>;
}

impl Raw for f32 {
    const SIZE: usize = 4;
    fn from_bytes(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn to_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_ne_bytes()).collect()
    }
}

macro_rules! raw_half {
    ($t:ty) => {
        impl Raw for $t {
            const SIZE: usize = 2;
            fn from_bytes(b: &[u8]) -> Vec<$t> {
                b.chunks_exact(2)
                    .map(|c| <$t>::from_bits(u16::from_ne_bytes(c.try_into().unwrap())))
                    .collect()
            }
            fn to_bytes(v: &[$t]) -> Vec<u8> {
                v.iter().flat_map(|x| x.to_bits().to_ne_bytes()).collect()
            }
        }
    };
}
raw_half!(bf16);
raw_half!(f16);

/// One recorded step: per tensor, the weights before and after and the gradients (`None`: no
/// gradient), as bytes; and what the C call returned.
struct Step {
    weights_before: Vec<Vec<u8>>,
    grads: Vec<Option<Vec<u8>>>,
    weights_after: Vec<Vec<u8>>,
    status: i32,
    report: (u64, i32, i32, f32),
}

/// Runs `step` through the Rust API with weights of `E` and gradients of `F`; returns the
/// weights after, and the report or `None` for an error.
fn replay_step<E: Raw, F: Raw>(
    opt: &mut dyn Optimizer,
    step: &Step,
) -> (Vec<Vec<u8>>, Option<fusedopt::StepReport>) {
    let mut weights: Vec<Vec<E>> = step
        .weights_before
        .iter()
        .map(|b| E::from_bytes(b))
        .collect();
    let grads: Vec<Option<Vec<F>>> = step
        .grads
        .iter()
        .map(|g| g.as_ref().map(|g| F::from_bytes(g)))
        .collect();
    let result = if grads.iter().all(Option::is_some) {
        let grads: Vec<Vec<F>> = grads.into_iter().map(Option::unwrap).collect();
        if E::SIZE == 4 && F::SIZE == 4 && weights.len() == 1 {
            // A single f32 tensor: `Optimizer::step`, as `fusedopt_step` would be.
            let w: &mut [f32] = bytemuck_f32(&mut weights[0]);
            let g: Vec<f32> = f32::from_bytes(&F::to_bytes(&grads[0]));
            opt.step(w, &g)
        } else {
            opt.step_all_typed(&mut weights, &grads)
        }
    } else {
        opt.step_partial_typed(&mut weights, &grads)
    };
    let after = weights.iter().map(|w| E::to_bytes(w)).collect();
    (after, result.ok())
}

/// `v` as `f32`s when `E` is `f32`.
fn bytemuck_f32<E: Raw>(v: &mut [E]) -> &mut [f32] {
    assert_eq!(E::DTYPE, fusedopt::Dtype::F32);
    // SAFETY: `E` is `f32` (checked above).
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<f32>(), v.len()) }
}

/// Checks that the state file at `path` holds `opt`'s state.
fn check_saved(opt: &dyn Optimizer, path: &Path, what: &str) {
    let mut fresh = opt.config().build();
    fresh
        .set_state_format(opt.state_format())
        .expect("a fresh optimizer takes any format");
    let names: Vec<&str> = opt.tensor_names().iter().map(String::as_str).collect();
    if !names.is_empty() {
        fresh.set_tensor_names(&names).unwrap();
    }
    fresh
        .load_state(path)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(fresh.steps(), opt.steps(), "{what}: steps");
    assert_eq!(
        fresh.tensor_steps(),
        opt.tensor_steps(),
        "{what}: tensor steps"
    );
    assert_eq!(fresh.layout(), opt.layout(), "{what}: layout");
    for buffer in opt.state_names() {
        for t in 0..opt.layout().map_or(0, <[usize]>::len) {
            let a = opt.read_tensor_state(buffer, t).map(|v| f32::to_bytes(&v));
            let b = fresh
                .read_tensor_state(buffer, t)
                .map(|v| f32::to_bytes(&v));
            assert!(a == b, "{what}: buffer {buffer} of tensor {t} differs");
        }
    }
}

#[test]
#[ignore = "needs the trace of capi/tests/test_capi.c: run scripts/test-capi.sh"]
fn the_c_abi_steps_bitwise_as_the_rust_api() {
    let path = std::env::var("FUSEDOPT_CAPI_TRACE")
        .expect("FUSEDOPT_CAPI_TRACE names the trace (scripts/test-capi.sh sets it)");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut r = Reader { bytes, at: 0 };
    assert_eq!(r.take(8), b"FOTRACE1", "not a trace");
    let mut opts: HashMap<u32, Box<dyn Optimizer>> = HashMap::new();
    let (mut steps, mut elements, mut saves) = (0usize, 0usize, 0usize);
    loop {
        let op = r.u8();
        if op == b'E' {
            break;
        }
        let id = r.u32();
        let what = format!("handle {id}, record at byte {}", r.at);
        if op == b'N' {
            let config: OptimizerConfig = r.string().parse().expect("the C side's config parsed");
            opts.insert(id, config.build());
            continue;
        }
        let opt = opts.get_mut(&id).expect("a live handle");
        match op {
            b'F' => drop(opts.remove(&id)),
            b'L' => opt.set_lr(r.f32()),
            b'H' => opt.set_threads(r.u64() as usize).unwrap(),
            b'C' => opt.set_chunk_len(r.u64() as usize),
            b'G' => opt.set_grad_scale(r.f32()).unwrap(),
            b'M' => {
                let on = r.u8() != 0;
                let max = r.f32();
                opt.set_max_grad_norm(on.then_some(max)).unwrap();
            }
            b'P' => opt.set_non_finite(policy(r.i32())),
            b'S' => {
                // fusedopt_set_settings: backend, threads, chunk_len, grad_scale, clip and
                // max_grad_norm, non_finite, state_format.
                let backend = match r.i32() {
                    0 => Backend::Simd,
                    1 => Backend::Scalar,
                    b => Backend::Level(SimdLevel::ALL[b as usize - 1]),
                };
                let (threads, chunk_len, scale) = (r.u64() as usize, r.u64() as usize, r.f32());
                let (clip, max) = (r.i32() != 0, r.f32());
                let non_finite = policy(r.i32());
                let format = StateFormat::ALL[r.i32() as usize];
                let settings = Settings::default()
                    .with_backend(backend)
                    .with_threads(threads)
                    .with_chunk_len(chunk_len)
                    .with_grad_scale(scale)
                    .with_max_grad_norm(clip.then_some(max))
                    .with_non_finite(non_finite)
                    .with_state_format(format);
                opt.set_settings(settings).unwrap();
            }
            b'Q' => {
                let format: StateFormat = r.string().parse().unwrap();
                opt.set_state_format(format).unwrap();
            }
            b'R' => {
                let n = r.u32() as usize;
                let groups: Vec<ParamGroup> = (0..n)
                    .map(|_| {
                        let (lr_scale, wd, on) = (r.f32(), r.f32(), r.i32());
                        ParamGroup {
                            lr_scale,
                            weight_decay: (on != 0).then_some(wd),
                        }
                    })
                    .collect();
                opt.set_param_groups(&groups).unwrap();
            }
            b'A' => {
                let n = r.u32() as usize;
                let names: Vec<String> = (0..n).map(|_| r.string()).collect();
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                opt.set_tensor_names(&names).unwrap();
            }
            b'Z' => opt.reset(),
            b'V' => {
                check_saved(&**opt, Path::new(&r.string()), &what);
                saves += 1;
            }
            b'O' => {
                let file = r.string();
                opt.load_state(Path::new(&file))
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
            }
            b'T' => {
                let (wd, gd) = (r.i32(), r.i32());
                let size = |d: i32| if d == 0 { 4 } else { 2 };
                let n = r.u32() as usize;
                let mut step = Step {
                    weights_before: Vec::new(),
                    grads: Vec::new(),
                    weights_after: Vec::new(),
                    status: 0,
                    report: (0, 0, 0, 0.0),
                };
                for _ in 0..n {
                    let len = r.u64() as usize;
                    elements += len;
                    step.weights_before.push(r.take(len * size(wd)).to_vec());
                    let has = r.u8() != 0;
                    step.grads
                        .push(has.then(|| r.take(len * size(gd)).to_vec()));
                    step.weights_after.push(r.take(len * size(wd)).to_vec());
                }
                step.status = r.i32();
                step.report = (r.u64(), r.i32(), r.i32(), r.f32());
                let opt = &mut **opt;
                let (after, report) = match (wd, gd) {
                    (0, 0) => replay_step::<f32, f32>(opt, &step),
                    (0, 1) => replay_step::<f32, bf16>(opt, &step),
                    (0, 2) => replay_step::<f32, f16>(opt, &step),
                    (1, 0) => replay_step::<bf16, f32>(opt, &step),
                    (1, 1) => replay_step::<bf16, bf16>(opt, &step),
                    (1, 2) => replay_step::<bf16, f16>(opt, &step),
                    (2, 0) => replay_step::<f16, f32>(opt, &step),
                    (2, 1) => replay_step::<f16, bf16>(opt, &step),
                    (2, 2) => replay_step::<f16, f16>(opt, &step),
                    other => panic!("dtypes {other:?}"),
                };
                assert_eq!(
                    report.is_some(),
                    step.status == 0,
                    "{what}: the C call returned status {}",
                    step.status
                );
                for (t, (rust, c)) in after.iter().zip(&step.weights_after).enumerate() {
                    assert!(rust == c, "{what}: tensor {t}'s weights differ");
                }
                if let Some(report) = report {
                    let (s, skipped, has_norm, norm) = step.report;
                    assert_eq!(report.step, s, "{what}: report.step");
                    assert_eq!(report.skipped, skipped != 0, "{what}: report.skipped");
                    assert_eq!(report.grad_norm.is_some(), has_norm != 0, "{what}: norm");
                    if let Some(n) = report.grad_norm {
                        assert_eq!(n.to_bits(), norm.to_bits(), "{what}: grad_norm");
                    }
                }
                steps += 1;
            }
            other => panic!("{what}: unknown record {other}"),
        }
    }
    assert!(opts.is_empty(), "the C program freed every handle");
    assert!(steps > 500 && saves >= 3, "{steps} steps, {saves} saves");
    println!("replayed {steps} steps ({elements} elements) and {saves} state files bitwise");
}
