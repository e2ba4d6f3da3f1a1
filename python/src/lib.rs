//! `quorum._native`: the Rust side of quorum's Python package.
//!
//! A Python gradient function becomes a [`GradientSource`], and [`quorum_net::run_worker`] —
//! the worker rule and protocol of `quorum worker`, not a second implementation — drives it:
//! join, pull the newest parameters, call the function (GIL held), push its gradient, with
//! heartbeats, reconnects and late notices in the background (GIL released). The Python
//! package (`python/quorum/`) builds the PyTorch helpers on this.
//!
//! Parameters and gradients cross into Python through two `bytearray`s the caller owns: the
//! function sees the newest parameters in one and writes its gradient into the other, so a
//! PyTorch module whose tensors are views into them moves no tensor one by one.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict};
use quorum_compute::{BatchId, ComputeError, Evaluation, GradientSource};
use quorum_core::ParamLayout;
use quorum_net::worker::{WorkerError, WorkerOptions, WorkerReport};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

create_exception!(_native, QuorumError, PyException, "A quorum worker failed; the message says why and what to do.");
create_exception!(
    _native,
    RefusedError,
    QuorumError,
    "The parameter server refused this worker (another model, a wrong join token, an index out of range)."
);
create_exception!(
    _native,
    UnreachableError,
    QuorumError,
    "The parameter server could not be reached within the connect time-out."
);

/// A layout as Python sees it: `[(name, shape), ...]`.
type PyLayout = Vec<(String, Vec<usize>)>;

/// `[(name, shape), ...]` from Python as a layout.
fn layout_of(tensors: PyLayout) -> PyResult<ParamLayout> {
    if tensors.is_empty() {
        return Err(PyValueError::new_err("the layout names no tensor: give [(name, shape), ...]"));
    }
    ParamLayout::from_shapes(tensors).map_err(|e| PyValueError::new_err(e.to_string()))
}

fn layout_list(layout: &ParamLayout) -> PyLayout {
    layout.fingerprint()
}

/// Where a Python worker's gradients come from.
enum Gradients {
    /// `Worker.run`: a function `gradient(step, params, grads) -> loss`, called with the GIL
    /// held, on two bytearrays the caller owns.
    Call {
        function: Py<PyAny>,
        params: Py<PyByteArray>,
        grads: Py<PyByteArray>,
        /// What the function raised, for `Worker.run` to raise again as it was.
        raised: Arc<Mutex<Option<PyErr>>>,
    },
    /// The step-wise use (`for step, params in worker`): the parameters go out to the Python
    /// thread, the gradient comes back from it.
    Handoff { steps: mpsc::SyncSender<(u64, Vec<f32>)>, gradients: mpsc::Receiver<Handed> },
}

/// A Python worker's model as a gradient source: its layout, and where its gradients come from.
struct PySource {
    layout: ParamLayout,
    gradients: Gradients,
}

impl GradientSource for PySource {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// Not asked of a worker: the server holds the starting values (its parameter file).
    fn init_params(&self, _seed: u64) -> Vec<f32> {
        vec![0.0; self.layout.len()]
    }

    /// The batch is the Python code's business.
    fn batch_size(&self) -> usize {
        0
    }

    fn gradient(&mut self, params: &[f32], batch: BatchId, grad: &mut Vec<f32>) -> Result<f32, ComputeError> {
        if params.len() != self.layout.len() {
            return Err(ComputeError::WrongLength { got: params.len(), expected: self.layout.len() });
        }
        match &self.gradients {
            Gradients::Call { function, params: p, grads: g, raised } => {
                call(function, p, g, raised, params, batch.step, grad)
            }
            Gradients::Handoff { steps, gradients } => {
                let gone = || ComputeError::Failed("the Python side stopped iterating over the worker's steps".into());
                steps.send((batch.step, params.to_vec())).map_err(|_| gone())?;
                match gradients.recv() {
                    Ok(Ok((g, loss))) => {
                        *grad = g;
                        Ok(loss)
                    }
                    Ok(Err(why)) => Err(ComputeError::Failed(why)),
                    Err(_) => Err(gone()),
                }
            }
        }
    }

    fn evaluate(&mut self, _params: &[f32]) -> Result<Evaluation, ComputeError> {
        Err(ComputeError::Config("a Python worker does not evaluate".into()))
    }
}

/// `Worker.run`'s step: the parameters into `p`, the function called, the gradient out of `g`.
fn call(
    function: &Py<PyAny>,
    p: &Py<PyByteArray>,
    g: &Py<PyByteArray>,
    raised: &Mutex<Option<PyErr>>,
    params: &[f32],
    step: u64,
    grad: &mut Vec<f32>,
) -> Result<f32, ComputeError> {
    let bytes = 4 * params.len();
    Python::attach(|py| {
        let (p, g) = (p.bind(py), g.bind(py));
        if p.len() != bytes || g.len() != bytes {
            return Err(ComputeError::Failed(format!(
                "the params and grads bytearrays must hold {bytes} bytes (the layout's {} float32 values); \
                 they hold {} and {}: do not resize them",
                params.len(),
                p.len(),
                g.len()
            )));
        }
        // SAFETY: the GIL is held and no Python code runs while this slice lives; the
        // lengths were checked just above.
        unsafe { p.as_bytes_mut() }.copy_from_slice(bytemuck::cast_slice(params));
        let called = function.call1(py, (step, p, g));
        let loss = called.and_then(|r| if r.is_none(py) { Ok(f32::NAN) } else { r.extract::<f32>(py) });
        let loss = loss.map_err(|e| {
            let said = format!("the Python gradient function raised {e}");
            *raised.lock().expect("not poisoned") = Some(e);
            ComputeError::Failed(said)
        })?;
        if g.len() != bytes {
            return Err(ComputeError::Failed("the gradient function resized the grads bytearray".into()));
        }
        grad.clear();
        grad.resize(params.len(), 0.0);
        // SAFETY: as above; the length is checked again after the function ran.
        bytemuck::cast_slice_mut::<f32, u8>(grad).copy_from_slice(unsafe { g.as_bytes() });
        Ok(loss)
    })
}

/// One worker of a quorum parameter server, computing its gradients in Python.
#[pyclass(module = "quorum._native")]
struct Worker {
    opts: WorkerOptions,
    layout: ParamLayout,
    /// The step-wise use (`for step, params in worker`): the worker loop on its own thread.
    stepping: Option<Stepping>,
    /// What the worker did, once its loop ended.
    report: Option<WorkerReport>,
}

/// A gradient from Python, or why there is none.
type Handed = Result<(Vec<f32>, f32), String>;

/// The step-wise use's state: the worker loop (quorum's, on its own thread) hands each step's
/// parameters out through `steps` and waits for the gradient on `gradients`.
struct Stepping {
    /// (A mutex only so the class is `Sync`, as Python classes must be; one thread uses it.)
    steps: Mutex<mpsc::Receiver<(u64, Vec<f32>)>>,
    gradients: mpsc::SyncSender<Handed>,
    thread: Option<std::thread::JoinHandle<Result<WorkerReport, WorkerError>>>,
    /// The step handed out whose gradient has not been pushed yet.
    awaiting: Option<u64>,
}

/// float32 values from a bytes-like object (`bytes` or `bytearray`) of exactly `n` values.
fn floats_from(obj: &Bound<'_, PyAny>, n: usize) -> PyResult<Vec<f32>> {
    let read = |b: &[u8]| -> PyResult<Vec<f32>> {
        if b.len() != 4 * n {
            return Err(PyValueError::new_err(format!(
                "the gradient has {} bytes; the layout's {n} float32 values take {}",
                b.len(),
                4 * n
            )));
        }
        Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
    };
    if let Ok(b) = obj.cast::<PyByteArray>() {
        // SAFETY: the GIL is held and nothing runs Python code while the slice lives.
        return read(unsafe { b.as_bytes() });
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return read(b.as_bytes());
    }
    Err(pyo3::exceptions::PyTypeError::new_err(
        "give the gradient as bytes or a bytearray of little-endian float32 (e.g. a bytearray viewed \
         with torch.frombuffer, or tensor.numpy().tobytes())",
    ))
}

#[pymethods]
impl Worker {
    /// `Worker(server, index, layout, *, token=None, tls_ca=None, tls_cert=None, tls_key=None,
    /// seed=1, connect_timeout=60.0, heartbeat_every=2.0, rpc_timeout=30.0)`: the options of
    /// `quorum worker`. `server` is `HOST:PORT` (or a URL), in a sharded run every shard's,
    /// comma-separated, shard 0 first; `layout` is `[(name, shape), ...]`
    /// in the order of the flat buffers, the same as the server's.
    #[new]
    #[pyo3(signature = (server, index, layout, *, token=None, tls_ca=None, tls_cert=None, tls_key=None,
        seed=1, connect_timeout=60.0, heartbeat_every=2.0, rpc_timeout=30.0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        server: String,
        index: u32,
        layout: Vec<(String, Vec<usize>)>,
        token: Option<String>,
        tls_ca: Option<PathBuf>,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        seed: u64,
        connect_timeout: f64,
        heartbeat_every: f64,
        rpc_timeout: f64,
    ) -> PyResult<Self> {
        let url = |a: &str| if a.contains("://") { a.to_string() } else { format!("http://{a}") };
        let servers: Vec<String> = server.split(',').map(|a| url(a.trim())).collect();
        let mut opts = WorkerOptions::new(index, servers[0].clone());
        opts.shards = servers[1..].to_vec();
        let secs = |name: &str, s: f64| {
            Duration::try_from_secs_f64(s)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| PyValueError::new_err(format!("{name} must be a positive number of seconds, not {s}")))
        };
        opts.connect_timeout = secs("connect_timeout", connect_timeout)?;
        opts.heartbeat_every = secs("heartbeat_every", heartbeat_every)?;
        opts.rpc_timeout = secs("rpc_timeout", rpc_timeout)?;
        opts.seed = seed;
        opts.token = token
            .or_else(|| std::env::var("QUORUM_TOKEN").ok())
            .map(quorum_net::auth::Token::new)
            .transpose()
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        opts.tls = quorum_net::tls::TlsFiles { cert: tls_cert, key: tls_key, ca: tls_ca };
        Ok(Worker { opts, layout: layout_of(layout)?, stepping: None, report: None })
    }

    /// Float32 values in the layout.
    #[getter]
    fn num_params(&self) -> usize {
        self.layout.len()
    }

    /// This worker's index.
    #[getter]
    fn index(&self) -> u32 {
        self.opts.index
    }

    /// Works until the server says stop, then returns what this worker did (a dict).
    ///
    /// `gradient(step, params, grads)` is called once per step with the step's parameters in
    /// `params`; it writes the mini-batch's mean gradient into `grads` and returns the loss
    /// (or None). `params` and `grads` are bytearrays of `4 * num_params` bytes (little-endian
    /// float32, laid out as the layout says) that the caller made and may view as tensors.
    /// An exception raised by `gradient` tells the server this worker left, and is raised here.
    fn run(
        &self,
        py: Python<'_>,
        gradient: Py<PyAny>,
        params: Py<PyByteArray>,
        grads: Py<PyByteArray>,
    ) -> PyResult<Py<PyDict>> {
        init_logging();
        let raised = Arc::new(Mutex::new(None));
        let source = PySource {
            layout: self.layout.clone(),
            gradients: Gradients::Call { function: gradient, params, grads, raised: raised.clone() },
        };
        let work = quorum_net::run_worker(self.opts.clone(), Box::new(source));
        match block_with_signals(py, work)? {
            Ok(report) => report_dict(py, &report),
            Err(e) => Err(to_python(e, raised.lock().expect("not poisoned").take())),
        }
    }

    /// The step-wise use: `for step, params in worker: ...; worker.push(grads, loss)`.
    ///
    /// Each iteration gives the parameters of the next step to compute (a bytearray of
    /// little-endian float32, laid out as the layout says); `push` hands the gradient back. The
    /// loop around it is quorum's worker (heartbeats while you compute, late notices,
    /// reconnects), on a thread of its own; the iteration ends when the server says stop.
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<(u64, Py<PyByteArray>)>> {
        if self.stepping.is_none() {
            if self.report.is_some() {
                return Ok(None);
            }
            init_logging();
            let (steps_tx, steps) = mpsc::sync_channel(1);
            let (gradients, gradients_rx) = mpsc::sync_channel(1);
            let source = PySource {
                layout: self.layout.clone(),
                gradients: Gradients::Handoff { steps: steps_tx, gradients: gradients_rx },
            };
            let opts = self.opts.clone();
            let thread = std::thread::Builder::new()
                .name(format!("quorum-worker-{}", self.opts.index))
                .spawn(move || -> Result<WorkerReport, WorkerError> {
                    let rt =
                        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(
                            |e| WorkerError::Refused { worker: opts.index, message: format!("runtime: {e}") },
                        )?;
                    rt.block_on(quorum_net::run_worker(opts, Box::new(source)))
                })
                .map_err(|e| QuorumError::new_err(format!("cannot start the worker thread: {e}")))?;
            self.stepping =
                Some(Stepping { steps: Mutex::new(steps), gradients, thread: Some(thread), awaiting: None });
        }
        let st = self.stepping.as_mut().expect("started above");
        if let Some(step) = st.awaiting {
            return Err(pyo3::exceptions::PyRuntimeError::new_err(format!(
                "push the gradient of step {step} (worker.push(grads, loss)) before asking for the next step"
            )));
        }
        loop {
            let steps = &st.steps;
            match py.detach(|| steps.lock().expect("not poisoned").recv_timeout(Duration::from_millis(200))) {
                Ok((step, values)) => {
                    st.awaiting = Some(step);
                    let bytes = PyByteArray::new(py, bytemuck::cast_slice(&values)).unbind();
                    return Ok(Some((step, bytes)));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => py.check_signals()?,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let thread = st.thread.take().expect("joined once");
                    self.stepping = None;
                    let ended = py.detach(|| thread.join());
                    return match ended {
                        Ok(Ok(report)) => {
                            self.report = Some(report);
                            Ok(None)
                        }
                        Ok(Err(e)) => Err(to_python(e, None)),
                        Err(_) => Err(QuorumError::new_err("the worker thread panicked")),
                    };
                }
            }
        }
    }

    /// Hands back the gradient of the step the iteration gave last: `grads` as bytes or a
    /// bytearray of little-endian float32 in layout order, `loss` the mini-batch loss (or None).
    #[pyo3(signature = (grads, loss=None))]
    fn push(&mut self, grads: &Bound<'_, PyAny>, loss: Option<f32>) -> PyResult<()> {
        let n = self.layout.len();
        let st = self.stepping.as_mut().filter(|s| s.awaiting.is_some()).ok_or_else(|| {
            pyo3::exceptions::PyRuntimeError::new_err("no step to push a gradient for: iterate over the worker first")
        })?;
        let g = floats_from(grads, n)?;
        st.awaiting = None;
        // A closed channel means the loop ended; the next iteration says how.
        let _ = st.gradients.send(Ok((g, loss.unwrap_or(f32::NAN))));
        Ok(())
    }

    /// Gives up on the step the iteration gave last, saying why: the server is told this
    /// worker left, and the iteration ends with an error saying `why`.
    fn fail(&mut self, why: String) -> PyResult<()> {
        if let Some(st) = self.stepping.as_mut().filter(|s| s.awaiting.is_some()) {
            st.awaiting = None;
            let _ = st.gradients.send(Err(why));
        }
        Ok(())
    }

    /// What the worker did (a dict), once its loop has ended; None before.
    #[getter]
    fn report(&self, py: Python<'_>) -> PyResult<Option<Py<PyDict>>> {
        self.report.as_ref().map(|r| report_dict(py, r)).transpose()
    }

    fn __repr__(&self) -> String {
        format!("Worker(server={:?}, index={}, {} parameters)", self.opts.server, self.opts.index, self.layout.len())
    }
}

/// An evaluator of a quorum parameter server: not a worker; pulls the parameters every
/// `every` steps and reports test figures, which the server writes to metrics.csv,
/// TensorBoard and its progress line as if it had evaluated them itself.
#[pyclass(module = "quorum._native")]
struct Evaluator {
    opts: WorkerOptions,
    num_params: usize,
    every: u64,
}

#[pymethods]
impl Evaluator {
    /// `Evaluator(server, layout, every=100, *, token=None, tls_ca=None, tls_cert=None,
    /// tls_key=None, connect_timeout=60.0, rpc_timeout=30.0)`.
    #[new]
    #[pyo3(signature = (server, layout, every=100, *, token=None, tls_ca=None, tls_cert=None, tls_key=None,
        connect_timeout=60.0, rpc_timeout=30.0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        server: String,
        layout: PyLayout,
        every: u64,
        token: Option<String>,
        tls_ca: Option<PathBuf>,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        connect_timeout: f64,
        rpc_timeout: f64,
    ) -> PyResult<Self> {
        if every == 0 {
            return Err(PyValueError::new_err("every must be at least 1 step"));
        }
        let w = Worker::new(server, 0, layout, token, tls_ca, tls_cert, tls_key, 1, connect_timeout, 2.0, rpc_timeout)?;
        Ok(Evaluator { num_params: w.layout.len(), opts: w.opts, every })
    }

    /// Evaluates until the server stops; returns `{"evaluations": ..., "last_step": ...}`.
    ///
    /// `evaluate(step, params)` gets the parameters after `step` updates in `params` (a
    /// bytearray of little-endian float32, refilled for each call) and returns
    /// `(loss, accuracy)`, accuracy a fraction in [0, 1] or None.
    fn run(&self, py: Python<'_>, evaluate: Py<PyAny>, params: Py<PyByteArray>) -> PyResult<Py<PyDict>> {
        init_logging();
        let raised: Arc<Mutex<Option<PyErr>>> = Arc::new(Mutex::new(None));
        let keep = raised.clone();
        let bytes = 4 * self.num_params;
        let f: quorum_net::evaluate::EvaluateFn = Box::new(move |step, values| {
            Python::attach(|py| {
                let p = params.bind(py);
                if p.len() != bytes {
                    return Err(ComputeError::Failed(format!("the params bytearray must hold {bytes} bytes")));
                }
                // SAFETY: the GIL is held and no Python code runs while this slice lives.
                unsafe { p.as_bytes_mut() }.copy_from_slice(bytemuck::cast_slice(values));
                let r = evaluate.call1(py, (step, p)).and_then(|r| r.extract::<(f32, Option<f32>)>(py));
                r.map(|(loss, accuracy)| Evaluation { loss, accuracy }).map_err(|e| {
                    let said = format!("the Python evaluation function raised {e}");
                    *keep.lock().expect("not poisoned") = Some(e);
                    ComputeError::Failed(said)
                })
            })
        });
        let work = quorum_net::evaluate::run_evaluator(self.opts.clone(), self.num_params, self.every, f);
        let report = block_with_signals(py, work)?;
        match report {
            Ok(r) => {
                let d = PyDict::new(py);
                d.set_item("evaluations", r.evaluations)?;
                d.set_item("last_step", r.last_step)?;
                d.set_item("reconnects", r.reconnects)?;
                Ok(d.unbind())
            }
            Err(e) => Err(to_python(e, raised.lock().expect("not poisoned").take())),
        }
    }
}

/// Runs `work` on a runtime of its own with the GIL released, looking for Ctrl-C every 200 ms.
fn block_with_signals<T: Send>(py: Python<'_>, work: impl std::future::Future<Output = T> + Send) -> PyResult<T> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| QuorumError::new_err(format!("cannot start the runtime: {e}")))?;
    let outcome = py.detach(|| {
        rt.block_on(async {
            tokio::pin!(work);
            loop {
                tokio::select! {
                    done = &mut work => break Ok::<_, PyErr>(done),
                    // Ctrl-C reaches Python only when it looks: look every 200 ms.
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                        Python::attach(|py| py.check_signals())?;
                    }
                }
            }
        })
    });
    // A Python function still running (after Ctrl-C) finishes on its own.
    rt.shutdown_background();
    outcome
}

/// A worker's error as a Python exception: what the Python function raised, as it was.
fn to_python(e: WorkerError, raised: Option<PyErr>) -> PyErr {
    match (e, raised) {
        (WorkerError::Compute { .. }, Some(original)) => original,
        (e @ WorkerError::Refused { .. }, _) => RefusedError::new_err(e.to_string()),
        (e @ WorkerError::Unreachable { .. }, _) => UnreachableError::new_err(e.to_string()),
        (e, _) => QuorumError::new_err(e.to_string()),
    }
}

fn report_dict(py: Python<'_>, r: &WorkerReport) -> PyResult<Py<PyDict>> {
    let d = PyDict::new(py);
    d.set_item("sent", r.sent)?;
    d.set_item("accepted", r.accepted)?;
    d.set_item("held", r.held)?;
    d.set_item("dropped", r.dropped)?;
    d.set_item("unsent_late", r.unsent_late)?;
    d.set_item("abandoned", r.abandoned)?;
    d.set_item("shm_pushes", r.shm_pushes)?;
    d.set_item("params_in_place", r.params_in_place)?;
    d.set_item("awaited", r.awaited)?;
    d.set_item("compute_seconds", r.compute_seconds)?;
    d.set_item("reconnects", r.reconnects)?;
    Ok(d.unbind())
}

/// Warnings (reconnects, a lost server) on standard error, as `quorum worker` prints them;
/// `RUST_LOG` chooses more.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// `write_params(path, layout, values)`: a parameter file for `quorum ps --params`, the
/// tensors of `layout` (`[(name, shape), ...]`) with `values` (bytes of little-endian float32,
/// laid out flat in that order).
#[pyfunction]
fn write_params(path: PathBuf, layout: Vec<(String, Vec<usize>)>, values: &[u8]) -> PyResult<()> {
    let layout = layout_of(layout)?;
    if values.len() != 4 * layout.len() {
        return Err(PyValueError::new_err(format!(
            "{} bytes of values for a layout of {} float32 values ({} bytes)",
            values.len(),
            layout.len(),
            4 * layout.len()
        )));
    }
    let flat: Vec<f32> = values.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
    quorum_net::params_file::write(&path, &layout, &flat).map_err(|e| QuorumError::new_err(e.to_string()))
}

/// `read_params(path) -> (layout, values)`: a parameter file, or a checkpoint's parameters
/// (its `ckpt-<step>.json`): the layout as `[(name, shape), ...]` and the values as bytes of
/// little-endian float32.
#[pyfunction]
fn read_params(py: Python<'_>, path: PathBuf) -> PyResult<(PyLayout, Py<PyBytes>)> {
    let (layout, values) = quorum_net::params_file::read(&path).map_err(|e| QuorumError::new_err(e.to_string()))?;
    let bytes = PyBytes::new(py, bytemuck::cast_slice(&values)).unbind();
    Ok((layout_list(&layout), bytes))
}

/// The newest checkpoint (`ckpt-<step>.json`) in a run's `checkpoints` folder, or None.
#[pyfunction]
fn latest_checkpoint(dir: PathBuf) -> Option<PathBuf> {
    quorum_net::checkpoint::list(&dir).into_iter().next().map(|(_, p)| p)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Worker>()?;
    m.add_class::<Evaluator>()?;
    m.add_function(wrap_pyfunction!(write_params, m)?)?;
    m.add_function(wrap_pyfunction!(read_params, m)?)?;
    m.add_function(wrap_pyfunction!(latest_checkpoint, m)?)?;
    m.add("QuorumError", m.py().get_type::<QuorumError>())?;
    m.add("RefusedError", m.py().get_type::<RefusedError>())?;
    m.add("UnreachableError", m.py().get_type::<UnreachableError>())?;
    Ok(())
}
