//! State access (`state_names`, `tensor_state`, `init_state`, `set_tensor_steps`): state copied
//! out of one optimizer and into a fresh one, as a framework's state dict carries it, continues
//! bitwise like the uninterrupted run; refused imports change nothing.

use crate::common::*;
use fusedopt::*;

const LENS: [usize; 4] = [5, 0, 1031, 17];

/// Every optimizer with its options, torch's momentum form and AMSGrad included.
fn variants() -> Vec<OptimizerConfig> {
    let mut v: Vec<OptimizerConfig> = configs()
        .into_iter()
        .map(|c| with(unusual(c), "weight_decay=0.01"))
        .collect();
    v.push("momentum:form=buffer,lr=0.05".parse().unwrap());
    v.push("nag:form=buffer,lr=0.05".parse().unwrap());
    v.push("adamw:amsgrad=true,lr=0.01".parse().unwrap());
    v
}

/// Which tensors have a gradient at step `s`.
fn present(s: usize, t: usize) -> bool {
    !(s * 7 + t * 3).is_multiple_of(4)
}

fn grads(rng: &mut Rng, s: usize) -> Vec<Option<Vec<f32>>> {
    LENS.iter()
        .enumerate()
        .map(|(t, &n)| present(s, t).then(|| rng.vec(n, 2.0)))
        .collect()
}

#[test]
fn state_copied_into_a_fresh_optimizer_continues_bitwise() {
    for config in variants() {
        let mut rng = Rng(3);
        let w0: Vec<Vec<f32>> = LENS.iter().map(|&n| rng.vec(n, 1.0)).collect();
        let all: Vec<_> = (0..12).map(|s| grads(&mut rng, s)).collect();
        let (mut whole, mut first) = (config.build(), config.build());
        let (mut w_whole, mut w_resumed) = (w0.clone(), w0.clone());
        for g in &all {
            whole.step_partial(&mut w_whole, g).unwrap();
        }
        for g in &all[..5] {
            first.step_partial(&mut w_resumed, g).unwrap();
        }
        // Copy the state out and into an optimizer that never stepped.
        let mut second = config.build();
        second.init_state(&LENS).unwrap();
        assert_eq!(second.state_names(), first.state_names(), "{config}");
        for name in first.state_names() {
            for (t, &len) in LENS.iter().enumerate() {
                let values = first.tensor_state(name, t).unwrap().to_vec();
                assert_eq!(values.len(), len);
                second
                    .tensor_state_mut(name, t)
                    .unwrap()
                    .copy_from_slice(&values);
            }
        }
        second.set_tensor_steps(first.tensor_steps()).unwrap();
        let sums: Vec<f64> = first.scalar_state().iter().map(|s| s.1).collect();
        second.set_scalar_state(&sums).unwrap();
        assert_eq!(second.tensor_steps(), first.tensor_steps());
        for g in &all[5..] {
            second.step_partial(&mut w_resumed, g).unwrap();
        }
        assert_eq!(bits(&w_resumed), bits(&w_whole), "{config}");
        assert_eq!(second.tensor_steps(), whole.tensor_steps(), "{config}");
    }
}

fn bits(ws: &[Vec<f32>]) -> Vec<Vec<u32>> {
    ws.iter()
        .map(|w| w.iter().map(|x| x.to_bits()).collect())
        .collect()
}

#[test]
fn state_names_follow_the_rule_and_its_options() {
    let expect: [(&str, &[&str]); 7] = [
        ("sgd", &[]),
        ("momentum", &["v"]),
        ("nag", &["v"]),
        ("adagrad", &["h"]),
        ("rmsprop", &["h"]),
        ("adam", &["m", "v"]),
        ("adam:amsgrad=true", &["m", "v", "v_max"]),
    ];
    for (config, names) in expect {
        let mut opt = config.parse::<OptimizerConfig>().unwrap().build();
        assert!(opt.state_names().is_empty(), "{config}");
        opt.init_state(&[3]).unwrap();
        assert_eq!(opt.state_names(), names, "{config}");
        assert_eq!(opt.layout(), Some(&[3][..]));
        for name in names {
            assert_eq!(opt.tensor_state(name, 0), Some(&[0.0f32; 3][..]));
            assert!(opt.tensor_state(name, 1).is_none());
        }
        assert!(opt.tensor_state("x", 0).is_none());
    }
}

#[test]
fn refused_imports_change_nothing() {
    let mut opt = "adam".parse::<OptimizerConfig>().unwrap().build();
    let mut w = [vec![1.0f32; 3], vec![1.0f32; 2]];
    opt.step_all(&mut w, &[vec![0.5f32; 3], vec![0.5f32; 2]])
        .unwrap();
    let before = opt.tensor_state("v", 1).unwrap().to_vec();
    assert!(matches!(
        opt.init_state(&[3, 4]),
        Err(StepError::TensorLen {
            tensor: 1,
            expected: 2,
            found: 4
        })
    ));
    assert!(matches!(
        opt.init_state(&[3]),
        Err(StepError::TensorCount {
            expected: 2,
            found: 1
        })
    ));
    assert!(matches!(
        opt.set_tensor_steps(&[1, 2, 3]),
        Err(StepError::TensorCount {
            expected: 2,
            found: 3
        })
    ));
    opt.init_state(&[3, 2]).unwrap(); // the same layout: kept as it is
    assert_eq!(opt.tensor_state("v", 1).unwrap(), before);
    assert_eq!((opt.steps(), opt.tensor_steps()), (1, &[1, 1][..]));

    let mut fresh = "adam".parse::<OptimizerConfig>().unwrap().build();
    assert!(fresh.set_tensor_steps(&[1]).is_err());
    fresh.set_param_groups(&[ParamGroup::default(); 2]).unwrap();
    assert!(matches!(
        fresh.init_state(&[4]),
        Err(StepError::GroupCount {
            groups: 2,
            tensors: 1
        })
    ));
    assert_eq!(fresh.layout(), None);
}
