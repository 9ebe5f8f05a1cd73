//! `smc-steer inspect`: a model's architecture, sizes, vocabulary, special tokens and chat
//! template, read from its files.

use smc_steer::lm::{
    cpu_features, cpu_kernels, device_name, parse_device, supported_devices, ChatMessage, GgufFile,
    KernelOptions, TransformerKernel,
};

use crate::args::{Format, InspectArgs};
use crate::failure::Failure;
use crate::model_path;

/// Print what the model files say about the model.
pub fn inspect(a: InspectArgs) -> Result<(), Failure> {
    let path = model_path::resolve(a.model.model.as_deref());
    let device = parse_device(&a.model.device)?;
    let kernel = TransformerKernel::load(
        &path,
        KernelOptions {
            particles: 1,
            max_new_tokens: 1,
            weights: a.model.weights,
            device: device.clone(),
            ..Default::default()
        },
    )?;
    let c = kernel.model().config();
    let tok = kernel.tokenizer();
    let special =
        |id: Option<u32>| id.map(|i| serde_json::json!({ "id": i, "text": kernel.decode(&[i]) }));
    let stops: Vec<_> = kernel
        .stop_tokens()
        .iter()
        .map(|&i| serde_json::json!({ "id": i, "text": kernel.decode(&[i]) }))
        .collect();
    let template = kernel
        .apply_chat_template(&[ChatMessage::system("S"), ChatMessage::user("U")], true)
        .ok();
    // For a GGUF file: its matrices by stored type, and how `--weights` holds each.
    let matrices = GgufFile::open(&path).ok().map(|g| {
        g.weight_plan(a.model.weights)
            .into_iter()
            .map(|(ty, (count, held))| {
                (
                    ty.to_string(),
                    serde_json::json!({ "count": count, "held_as": held }),
                )
            })
            .collect::<serde_json::Map<_, _>>()
    });
    let info = serde_json::json!({
        "path": path.display().to_string(),
        "architecture": kernel.model().arch().model_type.name(),
        "sliding_window": kernel.model().arch().sliding_window,
        "vocab_size": c.vocab_size,
        "tokenizer_tokens": tok.map(|t| t.vocab_size()),
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "layers": c.n_layers,
        "heads": c.n_heads,
        "kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "context_window": c.max_seq_len,
        "rope_theta": c.rope_theta,
        "tied_embeddings": c.tie_embeddings,
        "bos": special(tok.and_then(|t| t.bos_id())),
        "eos": special(tok.and_then(|t| t.eos_id())),
        "stop_tokens": stops,
        "chat_template_example": template,
        "device": device_name(&device),
        "devices_supported": supported_devices(),
        "weights": a.model.weights.name(),
        "weight_bytes": kernel.model().weight_bytes(),
        "file_matrices": matrices,
        "cpu_kernels": cpu_kernels(),
        "cpu_features": cpu_features(),
    });
    match a.format {
        Format::Json => println!("{info}"),
        Format::Text => {
            if let serde_json::Value::Object(m) = &info {
                for (k, v) in m {
                    match v {
                        serde_json::Value::String(s) if k == "chat_template_example" => {
                            println!("{k}:\n{s}")
                        }
                        _ => println!("{k}: {v}"),
                    }
                }
            }
        }
    }
    Ok(())
}
