//! A run as a standard ONNX file (opset 13). A QAT run is written in the QDQ form with clipped
//! ranges ("QCDQ", as Brevitas exports below 8 bits): every quantized input is QuantizeLinear →
//! Clip(±L) → DequantizeLinear on int8, every weight an int8 initializer holding its grid indices
//! with a per-output-channel DequantizeLinear (axis 0), batch norm folded into those scales and the
//! float biases. A float run is the plain float graph with batch norm folded. Pruned channels are
//! gone from both. `onnxruntime` (through python3, when installed) runs the file for `eval --onnx`
//! and the tests.
//!
//! The messages are the subset of `onnx.proto` this writer needs, encoded with prost.

use super::int_model::{InputGrid, IntModel};
use crate::model::layers::ConvBn;
use crate::model::resnet::Head;
use crate::model::ResNet;
use anyhow::{bail, Context, Result};
use prost::Message;

#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(int64, tag = "1")]
    ir_version: i64,
    #[prost(string, tag = "2")]
    producer_name: String,
    #[prost(string, tag = "3")]
    producer_version: String,
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    opset_import: Vec<OperatorSetIdProto>,
}

#[derive(Clone, PartialEq, Message)]
struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    domain: String,
    #[prost(int64, tag = "2")]
    version: i64,
}

#[derive(Clone, PartialEq, Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, Message)]
struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    output: Vec<String>,
    #[prost(string, tag = "3")]
    name: String,
    #[prost(string, tag = "4")]
    op_type: String,
    #[prost(message, repeated, tag = "5")]
    attribute: Vec<AttributeProto>,
}

/// `AttributeProto.AttributeType`: INT and INTS.
const ATTR_INT: i32 = 2;
const ATTR_INTS: i32 = 7;

#[derive(Clone, PartialEq, Message)]
struct AttributeProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(int64, tag = "3")]
    i: i64,
    #[prost(int64, repeated, tag = "8")]
    ints: Vec<i64>,
    #[prost(int32, tag = "20")]
    r#type: i32,
}

/// `TensorProto.DataType`.
const FLOAT: i32 = 1;
const INT8: i32 = 3;
const INT64: i32 = 7;

#[derive(Clone, PartialEq, Message)]
struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    data_type: i32,
    #[prost(string, tag = "8")]
    name: String,
    #[prost(bytes = "vec", tag = "9")]
    raw_data: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct ValueInfoProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TypeProto {
    /// The `tensor_type` member of the `value` oneof (the only one written).
    #[prost(message, optional, tag = "1")]
    tensor_type: Option<TensorTypeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorTypeProto {
    #[prost(int32, tag = "1")]
    elem_type: i32,
    #[prost(message, optional, tag = "2")]
    shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    dim: Vec<Dimension>,
}

#[derive(Clone, PartialEq, Message)]
struct Dimension {
    #[prost(int64, optional, tag = "1")]
    dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    dim_param: Option<String>,
}

/// One layer as the graph writes it.
struct GraphLayer {
    name: String,
    out_ch: usize,
    in_ch: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    weights: Weights,
    bias: Vec<f32>,
    /// The input's grid (QAT) or None (float).
    input: Option<InputGrid>,
}

enum Weights {
    Float(Vec<f32>),
    /// Grid indices and the real value of one step per output channel.
    Int {
        indices: Vec<i8>,
        steps: Vec<f32>,
    },
}

/// The network as layers: stem, blocks, classifier.
struct Layers {
    stem: GraphLayer,
    blocks: Vec<[GraphLayer; 2]>,
    classifier: GraphLayer,
}

fn from_int_model(model: &IntModel) -> Layers {
    let layer = |l: &super::int_model::IntLayer| {
        let s = &l.shape;
        let fraction = 2f64.powi(s.bias_bits as i32);
        GraphLayer {
            name: s.name.clone(),
            out_ch: s.out_ch,
            in_ch: s.in_ch,
            kernel: s.kernel,
            stride: s.stride,
            padding: s.padding,
            weights: Weights::Int { indices: l.weights.clone(), steps: l.weight_step.clone() },
            bias: l.bias.iter().enumerate().map(|(c, &b)| (b as f64 / fraction * l.acc_step(c)) as f32).collect(),
            input: Some(s.input),
        }
    };
    Layers {
        stem: layer(&model.stem),
        blocks: model.blocks.iter().map(|[a, b]| [layer(a), layer(b)]).collect(),
        classifier: layer(&model.classifier),
    }
}

/// A float network with batch norm folded (W·γ/σ, β − μ·γ/σ) and pruned channels removed.
fn from_float(net: &ResNet) -> Result<Layers> {
    let conv = |l: &ConvBn, keep_out: Option<&[bool]>, keep_in: Option<&[bool]>| -> Result<GraphLayer> {
        if l.quant.is_some() {
            bail!("layer `{}` is quantized: export the run's integer model instead", l.name);
        }
        let (scale, shift) = l.eval_affine()?;
        let (scale, shift) = (scale.to_vec1::<f32>()?, shift.to_vec1::<f32>()?);
        let w = l.weight.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let k2 = l.kernel * l.kernel;
        let outs: Vec<usize> = (0..l.out_ch).filter(|&o| keep_out.is_none_or(|k| k[o])).collect();
        let ins: Vec<usize> = (0..l.in_ch).filter(|&c| keep_in.is_none_or(|k| k[c])).collect();
        let mut weights = Vec::with_capacity(outs.len() * ins.len() * k2);
        for &o in &outs {
            for &c in &ins {
                weights.extend(w[(o * l.in_ch + c) * k2..][..k2].iter().map(|v| v * scale[o]));
            }
        }
        Ok(GraphLayer {
            name: l.name.clone(),
            out_ch: outs.len(),
            in_ch: ins.len(),
            kernel: l.kernel,
            stride: l.stride,
            padding: l.padding,
            weights: Weights::Float(weights),
            bias: outs.iter().map(|&o| shift[o]).collect(),
            input: None,
        })
    };
    let Head::Linear(fc) = &net.head else {
        bail!("this run has one classifier head per label, which the ONNX exporter does not support")
    };
    let mut blocks = Vec::new();
    for b in &net.blocks {
        let keep = b.conv1.kept_mask()?;
        blocks.push([conv(&b.conv1, keep.as_deref(), None)?, conv(&b.conv2, None, keep.as_deref())?]);
    }
    let classifier = GraphLayer {
        name: "fc".into(),
        out_ch: fc.out_features,
        in_ch: fc.in_features,
        kernel: 1,
        stride: 1,
        padding: 0,
        weights: Weights::Float(fc.weight.as_tensor().flatten_all()?.to_vec1::<f32>()?),
        bias: fc.bias.as_tensor().to_vec1::<f32>()?,
        input: None,
    };
    Ok(Layers { stem: conv(&net.stem, None, None)?, blocks, classifier })
}

/// Nodes and initializers under construction.
#[derive(Default)]
struct Builder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), ints: values.to_vec(), r#type: ATTR_INTS, ..Default::default() }
}

fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto { name: name.into(), i: value, r#type: ATTR_INT, ..Default::default() }
}

impl Builder {
    fn tensor(&mut self, name: &str, dims: &[usize], data_type: i32, raw_data: Vec<u8>) -> String {
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type,
            name: name.into(),
            raw_data,
        });
        name.into()
    }

    fn floats(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        self.tensor(name, dims, FLOAT, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    fn int8s(&mut self, name: &str, dims: &[usize], values: &[i8]) -> String {
        self.tensor(name, dims, INT8, values.iter().map(|&v| v as u8).collect())
    }

    fn int64s(&mut self, name: &str, values: &[i64]) -> String {
        self.tensor(name, &[values.len()], INT64, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// Adds `op` reading `inputs`, writing `output`; returns `output`.
    fn node(&mut self, op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> String {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            name: output.into(),
            op_type: op.into(),
            attribute,
        });
        output.into()
    }

    /// `x` through its grid: QuantizeLinear → Clip(−L, L) → DequantizeLinear (int8, zero point 0).
    fn fake_quant(&mut self, x: &str, grid: InputGrid, name: &str) -> String {
        let scale = self.floats(&format!("{name}.scale"), &[], &[grid.step() as f32]);
        let zero = self.int8s(&format!("{name}.zero_point"), &[], &[0]);
        let levels = grid.levels.clamp(1, 127) as i8;
        let lo = self.int8s(&format!("{name}.min"), &[], &[-levels]);
        let hi = self.int8s(&format!("{name}.max"), &[], &[levels]);
        let q = self.node("QuantizeLinear", &[x, &scale, &zero], &format!("{name}.q"), vec![]);
        let c = self.node("Clip", &[&q, &lo, &hi], &format!("{name}.clipped"), vec![]);
        self.node("DequantizeLinear", &[&c, &scale, &zero], &format!("{name}.dq"), vec![])
    }

    /// The layer's real weights: an initializer (float) or int8 indices dequantized per channel.
    fn weights(&mut self, l: &GraphLayer, dims: &[usize]) -> String {
        match &l.weights {
            Weights::Float(w) => self.floats(&format!("{}.weight", l.name), dims, w),
            Weights::Int { indices, steps } => {
                let q = self.int8s(&format!("{}.weight_q", l.name), dims, indices);
                let scale = self.floats(&format!("{}.weight_scale", l.name), &[l.out_ch], steps);
                let zero = self.int8s(&format!("{}.weight_zero_point", l.name), &[l.out_ch], &vec![0; l.out_ch]);
                self.node("DequantizeLinear", &[&q, &scale, &zero], &format!("{}.weight", l.name), vec![int("axis", 0)])
            }
        }
    }

    /// A convolution with its (folded) bias, its input through its grid first when quantized.
    fn conv(&mut self, x: &str, l: &GraphLayer) -> String {
        let x = match l.input {
            Some(grid) => self.fake_quant(x, grid, &format!("{}.input", l.name)),
            None => x.to_string(),
        };
        let w = self.weights(l, &[l.out_ch, l.in_ch, l.kernel, l.kernel]);
        let b = self.floats(&format!("{}.bias", l.name), &[l.out_ch], &l.bias);
        let p = l.padding as i64;
        let attrs = vec![
            ints("kernel_shape", &[l.kernel as i64; 2]),
            ints("pads", &[p, p, p, p]),
            ints("strides", &[l.stride as i64; 2]),
        ];
        self.node("Conv", &[&x, &w, &b], &format!("{}.out", l.name), attrs)
    }

    /// Option A: every `stride`-th pixel, then zero channels up to `out_ch`.
    fn shortcut(&mut self, x: &str, stride: usize, in_ch: usize, out_ch: usize, name: &str) -> String {
        let mut y = x.to_string();
        if stride > 1 {
            let starts = self.int64s(&format!("{name}.starts"), &[0, 0]);
            let ends = self.int64s(&format!("{name}.ends"), &[i64::MAX, i64::MAX]);
            let axes = self.int64s(&format!("{name}.axes"), &[2, 3]);
            let steps = self.int64s(&format!("{name}.steps"), &[stride as i64; 2]);
            y = self.node("Slice", &[&y, &starts, &ends, &axes, &steps], &format!("{name}.sliced"), vec![]);
        }
        if out_ch > in_ch {
            let pads = self.int64s(&format!("{name}.pads"), &[0, 0, 0, 0, 0, (out_ch - in_ch) as i64, 0, 0]);
            y = self.node("Pad", &[&y, &pads], &format!("{name}.padded"), vec![]);
        }
        y
    }
}

/// The ONNX file's bytes for the network of `layers` reading (batch, c, h, w) float images named
/// `input` and writing (batch, classes) logits named `logits`.
fn encode(layers: &Layers, (c, h, w): (usize, usize, usize), doc: &str) -> Vec<u8> {
    let mut g = Builder::default();
    let stem = g.conv("input", &layers.stem);
    let mut stream = g.node("Relu", &[&stem], "stem.relu", vec![]);
    let mut channels = layers.stem.out_ch;
    for [first, second] in &layers.blocks {
        let block = first.name.trim_end_matches(".conv1").to_string();
        let a = g.conv(&stream, first);
        let a = g.node("Relu", &[&a], &format!("{}.relu", first.name), vec![]);
        let b = g.conv(&a, second);
        let short = g.shortcut(&stream, first.stride, channels, second.out_ch, &format!("{block}.shortcut"));
        let sum = g.node("Add", &[&b, &short], &format!("{block}.add"), vec![]);
        stream = g.node("Relu", &[&sum], &format!("{block}.relu"), vec![]);
        channels = second.out_ch;
    }
    let pooled = g.node("GlobalAveragePool", &[&stream], "pool", vec![]);
    let flat = g.node("Flatten", &[&pooled], "pool.flat", vec![int("axis", 1)]);
    let fc = &layers.classifier;
    let x = match fc.input {
        Some(grid) => g.fake_quant(&flat, grid, "fc.input"),
        None => flat,
    };
    let wt = g.weights(fc, &[fc.out_ch, fc.in_ch]);
    let bias = g.floats("fc.bias", &[fc.out_ch], &fc.bias);
    g.node("Gemm", &[&x, &wt, &bias], "logits", vec![int("transB", 1)]);
    let tensor = |name: &str, dims: Vec<Dimension>| ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto { elem_type: FLOAT, shape: Some(TensorShapeProto { dim: dims }) }),
        }),
    };
    let fixed = |v: usize| Dimension { dim_value: Some(v as i64), dim_param: None };
    let batch = || Dimension { dim_value: None, dim_param: Some("batch".into()) };
    let model = ModelProto {
        ir_version: 7,
        producer_name: "qat-lab".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(GraphProto {
            node: g.nodes,
            name: doc.into(),
            initializer: g.initializers,
            input: vec![tensor("input", vec![batch(), fixed(c), fixed(h), fixed(w)])],
            output: vec![tensor("logits", vec![batch(), fixed(fc.out_ch)])],
        }),
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 13 }],
    };
    model.encode_to_vec()
}

/// The ONNX file of a trained network for images of `shape`: QCDQ from its integer model when it is
/// quantized, else the float graph.
pub fn to_bytes(net: &ResNet, model: Option<&IntModel>, shape: (usize, usize, usize), name: &str) -> Result<Vec<u8>> {
    let layers = match model {
        Some(m) => from_int_model(m),
        None => from_float(net)?,
    };
    Ok(encode(&layers, shape, name))
}

/// What onnxruntime computed.
pub struct OrtRun {
    pub logits: Vec<f32>,
    /// Images per second of the inference calls alone (batches of `batch`).
    pub images_per_sec: f64,
    pub version: String,
}

/// Logits of `n` NCHW images of `shape` from the ONNX file at `path`, computed by onnxruntime through
/// python3, `batch` images a call; Err with the reason when python3 or onnxruntime is not there.
/// `optimized` lets onnxruntime rewrite the graph (it fuses QDQ patterns into its integer kernels,
/// with their own rounding); without it the graph runs as written.
pub fn run_onnxruntime(
    path: &std::path::Path,
    images: &[f32],
    n: usize,
    shape: (usize, usize, usize),
    batch: usize,
    optimized: bool,
) -> Result<OrtRun> {
    const SCRIPT: &str = "import sys, time, numpy as np, onnxruntime as ort\n\
        c, h, w, b, optimized = (int(v) for v in sys.argv[4:9])\n\
        x = np.fromfile(sys.argv[2], dtype='<f4').reshape(-1, c, h, w)\n\
        o = ort.SessionOptions()\n\
        if not optimized: o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL\n\
        s = ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])\n\
        s.run(None, {'input': x[:b]})\n\
        t = time.perf_counter()\n\
        y = np.concatenate([s.run(None, {'input': x[i:i + b]})[0] for i in range(0, len(x), b)])\n\
        print(time.perf_counter() - t, ort.__version__)\n\
        y.astype('<f4').tofile(sys.argv[3])\n";
    let dir = tempfile::tempdir()?;
    let (input, output) = (dir.path().join("images.f32"), dir.path().join("logits.f32"));
    std::fs::write(&input, images.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
    let result = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(path)
        .arg(&input)
        .arg(&output)
        .args([shape.0, shape.1, shape.2, batch.max(1), usize::from(optimized)].map(|v| v.to_string()))
        .output();
    let answer = (|| -> Result<OrtRun> {
        let out = result.context("python3 is not installed (onnxruntime runs through it)")?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("No module named") {
                bail!("onnxruntime is not installed: pip install onnxruntime numpy");
            }
            bail!("onnxruntime could not run {}: {}", path.display(), err.trim());
        }
        let bytes = std::fs::read(&output)?;
        let logits: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        if n == 0 || !logits.len().is_multiple_of(n) {
            bail!("onnxruntime returned {} values for {n} images", logits.len());
        }
        let said = String::from_utf8_lossy(&out.stdout);
        let mut words = said.split_whitespace();
        let secs: f64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(f64::NAN);
        let version = words.next().unwrap_or("?").to_string();
        Ok(OrtRun { logits, images_per_sec: n as f64 / secs, version })
    })();
    answer
}
