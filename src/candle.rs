//! The optimizers as [`candle_nn::Optimizer`]s over candle [`Var`]s (cargo feature `candle`).
//! Imports the crate's optimizer, rule and [`TensorFeed`] layers; nothing below it knows about
//! candle.
//!
//! Switching a candle trainer is one line:
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use candle_nn::{Optimizer, ParamsAdamW};
//!
//! # fn main() -> candle_core::Result<()> {
//! let w = Var::new(&[3.0f32, -2.0], &Device::Cpu)?;
//! // was: let mut opt = candle_nn::AdamW::new(vec![w.clone()], ParamsAdamW::default())?;
//! let mut opt = fusedopt::candle::AdamW::new(vec![w.clone()], ParamsAdamW { lr: 0.1, ..Default::default() })?;
//! for _ in 0..100 {
//!     let loss = w.as_tensor().sqr()?.sum_all()?;
//!     opt.backward_step(&loss)?;
//! }
//! assert!(w.as_tensor().abs()?.max(0)?.to_scalar::<f32>()? < 0.5);
//! # Ok(())
//! # }
//! ```
//!
//! [`AdamW`] takes candle's [`ParamsAdamW`] (its defaults, and its rule: decoupled weight decay,
//! `ε` added to the bias-corrected `√v̂`); [`Sgd`] takes candle's learning rate; [`VarOptimizer`]
//! runs any fusedopt optimizer with its own configuration (`VarOptimizer<MomentumConfig>`, ...).
//!
//! # Vars, gradients, steps
//! - Vars must be CPU `f32` and contiguous, and distinct (no Var twice, no two sharing storage);
//!   construction refuses anything else with an error.
//! - A step reads each Var's gradient from the [`GradStore`]: a Var without one is left alone
//!   and keeps its own step count (as candle-nn does). A gradient on another device, of another
//!   type or shape, or sharing storage with any Var, is an error before anything changes (so no
//!   candle lock is ever taken twice). A strided gradient is copied to a contiguous one first
//!   (one allocation of its size per step).
//! - The step is fed one Var at a time ([`Optimizer::step_feed`]): each Var is locked once, for
//!   its own update, never all at once, and tasks of Vars run on the optimizer's threads.
//! - [`VarOptimizer::from_varmap`] takes the Vars of a [`VarMap`] in the order of their names
//!   and names the optimizer's tensors after them: state files ([`Optimizer::save_state`],
//!   reached through [`optimizer`](VarOptimizer::optimizer)) then load after a restart, whatever
//!   order the map lists its Vars in, and refuse a model whose names differ.

use crate::engine::{FeedError, TensorFeed};
use crate::optim::adam::{AdamConfig, EpsMode};
use crate::optim::sgd::SgdConfig;
use crate::optim::{Fused, Rule};
use crate::optimizer::Optimizer;
use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, DType, Error, InplaceOp2, Layout, Result, Shape, Storage, Tensor, Var,
};
use candle_nn::{ParamsAdamW, VarMap};
use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicPtr, Ordering};

/// Any fusedopt optimizer over candle Vars, as a [`candle_nn::Optimizer`] whose configuration is
/// the optimizer's own (`VarOptimizer<MomentumConfig>` takes a
/// [`MomentumConfig`](crate::MomentumConfig)).
///
/// ```
/// use candle_core::{Device, Var};
/// use candle_nn::Optimizer;
/// use fusedopt::MomentumConfig;
/// use fusedopt::candle::VarOptimizer;
///
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::new(&[1.0f32, 2.0], &Device::Cpu)?;
/// let mut opt = VarOptimizer::new(vec![w.clone()], MomentumConfig { lr: 0.1, ..Default::default() })?;
/// opt.backward_step(&w.as_tensor().sum_all()?)?; // the gradient is 1
/// assert_eq!(w.as_tensor().to_vec1::<f32>()?, [0.9, 1.9]);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct VarOptimizer<R: Rule> {
    vars: Vec<Var>,
    /// Each Var's shape (read once: a Var's metadata is a pointer away).
    shapes: Vec<Shape>,
    /// Where each Var's storage lives, to refuse gradients that share it.
    storages: HashSet<usize>,
    /// Each Var's contiguous gradient as the step's gradient phase found it (null: none), for
    /// its update phase.
    grads: Vec<AtomicPtr<Tensor>>,
    /// Contiguous copies of strided gradients.
    copies: Vec<OnceLock<Tensor>>,
    optimizer: Fused<R>,
    /// The learning rate as last given through candle's `f64` API, while it is still the
    /// optimizer's (which keeps an `f32`).
    lr: Option<f64>,
}

/// The address of the storage behind `tensor`: equal for tensors that share it.
fn storage_key(tensor: &Tensor) -> usize {
    let (storage, _) = tensor.storage_and_layout();
    std::ptr::from_ref::<Storage>(&storage).addr()
}

/// A candle error wrapping a fusedopt one.
fn error(e: impl std::fmt::Display + Send + Sync + 'static) -> Error {
    Error::wrap(e)
}

impl<R: Rule> VarOptimizer<R> {
    /// An optimizer of `config` over `vars`, in that order.
    ///
    /// # Errors
    /// A Var that is not on the CPU, not `f32`, not contiguous, or that appears twice (or shares
    /// its storage with another).
    pub fn new(vars: Vec<Var>, config: R) -> Result<Self> {
        let mut storages = HashSet::new();
        for (i, var) in vars.iter().enumerate() {
            if !var.device().is_cpu() {
                candle_core::bail!("Var {i} is on {:?}; fusedopt runs on the CPU", var.device());
            }
            if var.dtype() != DType::F32 {
                candle_core::bail!("Var {i} is {:?}; fusedopt updates f32 Vars", var.dtype());
            }
            if !var.is_contiguous() {
                candle_core::bail!("Var {i} is not contiguous");
            }
            if !storages.insert(storage_key(var.as_tensor())) {
                candle_core::bail!("Var {i} appears twice, or shares its storage with another Var");
            }
        }
        Ok(VarOptimizer {
            grads: vars
                .iter()
                .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                .collect(),
            copies: vars.iter().map(|_| OnceLock::new()).collect(),
            shapes: vars.iter().map(|v| v.shape().clone()).collect(),
            vars,
            storages,
            optimizer: Fused::new(config),
            lr: None,
        })
    }

    /// An optimizer of `config` over the Vars of `varmap`, in the order of their names, with
    /// the optimizer's tensors named after them (see the [module docs](self)).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use fusedopt::{AdamConfig, Optimizer};
    /// use fusedopt::candle::VarOptimizer;
    ///
    /// # fn main() -> candle_core::Result<()> {
    /// let varmap = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    /// let _layer = candle_nn::linear(4, 2, vb.pp("fc"))?;
    /// let opt = VarOptimizer::from_varmap(&varmap, AdamConfig::default())?;
    /// assert_eq!(opt.optimizer().tensor_names(), ["fc.bias", "fc.weight"]);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`new`](VarOptimizer::new), and a name that cannot name a tensor (one holding a comma
    /// or a line break).
    pub fn from_varmap(varmap: &VarMap, config: R) -> Result<Self> {
        let mut named: Vec<(String, Var)> = {
            let data = varmap.data().lock().map_err(|e| error(e.to_string()))?;
            data.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
        };
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
        let mut opt = Self::new(named.iter().map(|(_, v)| v.clone()).collect(), config)?;
        opt.optimizer.set_tensor_names(&names).map_err(error)?;
        Ok(opt)
    }

    /// The Vars, in the optimizer's order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The fusedopt optimizer: its settings, step counts and state files.
    pub fn optimizer(&self) -> &Fused<R> {
        &self.optimizer
    }

    /// The fusedopt optimizer, to change settings (threads, clipping, ...) or load a state file.
    pub fn optimizer_mut(&mut self) -> &mut Fused<R> {
        &mut self.optimizer
    }

    /// One step from `grads`; see the [module docs](self).
    ///
    /// # Errors
    /// A gradient on another device, of another type or shape, or sharing storage with a Var;
    /// any [`StepError`](crate::StepError) of the step. Nothing is modified then.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.grads
            .iter_mut()
            .for_each(|g| *g.get_mut() = std::ptr::null_mut());
        if self.copies.iter().any(|c| c.get().is_some()) {
            self.copies.iter_mut().for_each(|c| drop(c.take()));
        }
        let feed = VarFeed {
            vars: &self.vars,
            shapes: &self.shapes,
            storages: &self.storages,
            store: grads,
            grads: &self.grads,
            copies: &self.copies,
        };
        self.optimizer.step_feed(&feed).map_err(error)?;
        Ok(())
    }
}

impl<R: Rule> candle_nn::Optimizer for VarOptimizer<R> {
    type Config = R;

    fn new(vars: Vec<Var>, config: R) -> Result<Self> {
        VarOptimizer::new(vars, config)
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        VarOptimizer::step(self, grads)
    }

    fn learning_rate(&self) -> f64 {
        let lr = self.optimizer.lr();
        self.lr
            .filter(|&given| given as f32 == lr)
            .unwrap_or(f64::from(lr))
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.optimizer.set_lr(lr as f32);
        self.lr = Some(lr);
    }
}

/// The Vars and gradients of one step, lent one at a time.
struct VarFeed<'a> {
    vars: &'a [Var],
    shapes: &'a [Shape],
    storages: &'a HashSet<usize>,
    store: &'a GradStore,
    /// Each Var's contiguous gradient, once the gradient phase found it.
    grads: &'a [AtomicPtr<Tensor>],
    /// Contiguous copies of strided gradients.
    copies: &'a [OnceLock<Tensor>],
}

/// The `f32` elements of a contiguous CPU storage.
fn f32_slice<'s>(storage: &'s CpuStorage, layout: &Layout) -> Result<&'s [f32]> {
    let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
        candle_core::bail!("expected a contiguous f32 tensor");
    };
    Ok(&data[start..end])
}

impl<'a> VarFeed<'a> {
    /// Var `i`'s contiguous gradient, if it has one, after checking it (CPU, f32, the Var's
    /// shape); a strided one is copied. Records what it found for the update phase.
    fn checked_grad(&self, i: usize) -> Result<Option<&'a Tensor>> {
        let Some(grad) = self.store.get(&self.vars[i]) else {
            return Ok(None);
        };
        if !grad.device().is_cpu() || grad.dtype() != DType::F32 {
            candle_core::bail!(
                "the gradient is {:?} on {:?}; expected f32 on the CPU",
                grad.dtype(),
                grad.device()
            );
        }
        if *grad.shape() != self.shapes[i] {
            candle_core::bail!(
                "the gradient has shape {:?}, the Var {:?}",
                grad.shape(),
                self.shapes[i]
            );
        }
        let grad = if grad.is_contiguous() {
            grad
        } else {
            let copy = grad.contiguous()?;
            self.copies[i].get_or_init(|| copy)
        };
        self.grads[i].store(std::ptr::from_ref(grad).cast_mut(), Ordering::Relaxed);
        Ok(Some(grad))
    }

    /// Var `i`'s contiguous gradient, as the gradient phase found it.
    fn found_grad(&self, i: usize) -> Option<&'a Tensor> {
        let grad = self.grads[i].load(Ordering::Relaxed);
        // SAFETY: a non-null pointer was stored by `checked_grad` from a `&'a Tensor`, borrowed
        // from the gradient store or from `copies`, which the step holds (and does not change)
        // for `'a`. The update phase starts after the gradient phase has finished, so the store
        // happened before this load.
        (!grad.is_null()).then(|| unsafe { &*grad })
    }
}

impl TensorFeed for VarFeed<'_> {
    fn tensor_count(&self) -> usize {
        self.vars.len()
    }

    fn tensor_len(&self, tensor: usize) -> usize {
        self.shapes[tensor].elem_count()
    }

    fn grad(
        &self,
        tensor: usize,
        read: &mut dyn FnMut(Option<&[f32]>),
    ) -> std::result::Result<(), FeedError> {
        let Some(grad) = self.checked_grad(tensor)? else {
            read(None);
            return Ok(());
        };
        let (storage, layout) = grad.storage_and_layout();
        // Checked here, before any Var is locked for writing: a gradient sharing a Var's
        // storage would be read while that Var changes, or lock it twice.
        if self
            .storages
            .contains(&std::ptr::from_ref::<Storage>(&storage).addr())
        {
            return Err("the gradient shares storage with a Var".into());
        }
        let Storage::Cpu(cpu) = &*storage else {
            return Err("the gradient is not on the CPU".into());
        };
        read(Some(f32_slice(cpu, layout)?));
        Ok(())
    }

    fn update(
        &self,
        tensor: usize,
        update: &mut dyn FnMut(&mut [f32], &[f32]),
    ) -> std::result::Result<(), FeedError> {
        let grad = self.found_grad(tensor).ok_or("no gradient")?;
        let op = UpdateOp(RefCell::new(Some(update)));
        self.vars[tensor].inplace_op2(grad, &op)?;
        Ok(())
    }
}

/// A candle in-place op that lends a Var's storage, and its gradient's, to one update.
struct UpdateOp<'u>(RefCell<Option<Update<'u>>>);

/// The engine's update of one tensor: its weights and gradients.
type Update<'u> = &'u mut dyn FnMut(&mut [f32], &[f32]);

impl InplaceOp2 for UpdateOp<'_> {
    fn name(&self) -> &'static str {
        "fusedopt-update"
    }

    fn cpu_fwd(&self, w: &mut CpuStorage, wl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let g = f32_slice(g, gl)?;
        let (CpuStorage::F32(data), Some((start, end))) = (w, wl.contiguous_offsets()) else {
            candle_core::bail!("expected a contiguous f32 Var");
        };
        let update = self.0.borrow_mut().take();
        let update = update.ok_or_else(|| error("the update ran twice"))?;
        update(&mut data[start..end], g);
        Ok(())
    }
}

/// A candle-nn optimizer's configuration, as fusedopt runs it: its fusedopt rule and its
/// learning rate. Implemented by candle's [`ParamsAdamW`] ([`AdamW`]) and by `f64`, the
/// learning rate that configures candle's SGD ([`Sgd`]).
pub trait CandleConfig: Clone {
    /// The fusedopt configuration it corresponds to.
    type Rule: Rule;
    /// That configuration.
    fn rule(&self) -> Self::Rule;
    /// The learning rate, as candle gives it.
    fn lr(&self) -> f64;
}

/// candle's AdamW: decoupled weight decay, `ε` added to `√v̂`.
impl CandleConfig for ParamsAdamW {
    type Rule = AdamConfig;
    fn rule(&self) -> AdamConfig {
        AdamConfig {
            lr: self.lr as f32,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps as f32,
            weight_decay: self.weight_decay as f32,
            maximize: false,
            decoupled_weight_decay: true,
            amsgrad: false,
            eps_mode: EpsMode::SqrtVHat,
        }
    }
    fn lr(&self) -> f64 {
        self.lr
    }
}

/// candle's SGD: plain gradient descent at this learning rate.
impl CandleConfig for f64 {
    type Rule = SgdConfig;
    fn rule(&self) -> SgdConfig {
        SgdConfig {
            lr: *self as f32,
            ..Default::default()
        }
    }
    fn lr(&self) -> f64 {
        *self
    }
}

/// A candle-nn optimizer on fusedopt, configured as candle-nn's is ([`AdamW`], [`Sgd`]).
#[derive(Debug)]
pub struct Candle<C: CandleConfig> {
    inner: VarOptimizer<C::Rule>,
    config: C,
}

impl<C: CandleConfig> Candle<C> {
    /// The optimizer over `inner`'s Vars, with the learning rate candle gave.
    fn wrap(mut inner: VarOptimizer<C::Rule>, config: C) -> Self {
        inner.lr = Some(config.lr());
        Candle { inner, config }
    }

    /// [`VarOptimizer::from_varmap`] with candle's configuration.
    ///
    /// # Errors
    /// As [`VarOptimizer::from_varmap`].
    pub fn from_varmap(varmap: &VarMap, config: C) -> Result<Self> {
        let inner = VarOptimizer::from_varmap(varmap, config.rule())?;
        Ok(Self::wrap(inner, config))
    }

    /// The optimizer over the Vars ([`VarOptimizer`]).
    pub fn inner(&self) -> &VarOptimizer<C::Rule> {
        &self.inner
    }

    /// The optimizer over the Vars, to change settings or load a state file.
    pub fn inner_mut(&mut self) -> &mut VarOptimizer<C::Rule> {
        &mut self.inner
    }
}

impl<C: CandleConfig> candle_nn::Optimizer for Candle<C> {
    type Config = C;

    fn new(vars: Vec<Var>, config: C) -> Result<Self> {
        let inner = VarOptimizer::new(vars, config.rule())?;
        Ok(Self::wrap(inner, config))
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.inner.step(grads)
    }

    fn learning_rate(&self) -> f64 {
        candle_nn::Optimizer::learning_rate(&self.inner)
    }

    fn set_learning_rate(&mut self, lr: f64) {
        candle_nn::Optimizer::set_learning_rate(&mut self.inner, lr);
    }
}

/// candle-nn's `AdamW` on fusedopt: the same configuration ([`ParamsAdamW`], candle's defaults
/// lr 0.001, β 0.9/0.999, ε 1e-8, weight decay 0.01) and rule (decoupled weight decay, `ε` added
/// to `√v̂`), one fused pass per step.
///
/// ```
/// use candle_core::{Device, Var};
/// use candle_nn::{Optimizer, ParamsAdamW};
///
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::new(&[1.0f32; 4], &Device::Cpu)?;
/// let mut opt = fusedopt::candle::AdamW::new(vec![w.clone()], ParamsAdamW::default())?;
/// opt.backward_step(&w.as_tensor().sum_all()?)?;
/// assert_eq!(opt.learning_rate(), 0.001);
/// assert!(w.as_tensor().to_vec1::<f32>()?[0] < 1.0);
/// # Ok(())
/// # }
/// ```
pub type AdamW = Candle<ParamsAdamW>;

impl AdamW {
    /// The configuration, as candle-nn's `AdamW::params` gives it (with the current learning
    /// rate).
    pub fn params(&self) -> ParamsAdamW {
        ParamsAdamW {
            lr: candle_nn::Optimizer::learning_rate(&self.inner),
            ..self.config.clone()
        }
    }

    /// Replaces the configuration, as candle-nn's `AdamW::set_params` does.
    pub fn set_params(&mut self, params: ParamsAdamW) {
        *self.inner.optimizer.config_mut() = params.rule();
        self.inner.lr = Some(params.lr);
        self.config = params;
    }
}

/// candle-nn's `SGD` on fusedopt: plain gradient descent, configured by its learning rate.
///
/// ```
/// use candle_core::{Device, Var};
/// use candle_nn::Optimizer;
///
/// # fn main() -> candle_core::Result<()> {
/// let w = Var::new(&[1.0f32, 2.0], &Device::Cpu)?;
/// let mut opt = fusedopt::candle::Sgd::new(vec![w.clone()], 0.5)?;
/// opt.backward_step(&w.as_tensor().sum_all()?)?;
/// assert_eq!(w.as_tensor().to_vec1::<f32>()?, [0.5, 1.5]);
/// # Ok(())
/// # }
/// ```
pub type Sgd = Candle<f64>;
