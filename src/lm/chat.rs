//! Chat templates: the model's own Jinja template, rendered with minijinja.
//!
//! Instruction-tuned models expect their conversations in a specific markup (SmolLM2-Instruct
//! uses ChatML: `<|im_start|>role\ncontent<|im_end|>\n`). GGUF files carry the template as
//! `tokenizer.chat_template`; Hugging Face checkpoints carry it in `tokenizer_config.json`.
//! [`ChatTemplate::apply`] renders a conversation to text, which the tokenizer then encodes
//! (special-token markers in the text become their ids).

use minijinja::{Environment, ErrorKind};
use serde::Serialize;

use super::error::{LmError, LmResult};
use super::gguf::GgufFile;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A Jinja chat template with the special-token strings it may refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

/// ChatML, used when a model ships no template of its own.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

impl ChatTemplate {
    /// A template from Jinja source; `bos_token`/`eos_token` are exposed to it as variables.
    ///
    /// # Errors
    /// [`LmError::ChatTemplate`] if the source does not parse.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> LmResult<Self> {
        let t = Self {
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        };
        let env = Self::env();
        env.template_from_str(&t.source)
            .map_err(|e| LmError::ChatTemplate(e.to_string()))?;
        Ok(t)
    }

    /// The template stored in a GGUF file (`tokenizer.chat_template`), if any.
    ///
    /// # Errors
    /// [`LmError::ChatTemplate`] if it does not parse.
    pub fn from_gguf(g: &GgufFile) -> LmResult<Option<Self>> {
        let Some(src) = g.meta_str("tokenizer.chat_template") else {
            return Ok(None);
        };
        let token = |key: &str| -> String {
            let id = g.meta(key).and_then(|v| v.to_u32().ok());
            let tokens = g
                .meta("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok());
            match (id, tokens) {
                (Some(i), Some(ts)) => ts
                    .get(i as usize)
                    .and_then(|t| t.to_string().ok())
                    .cloned()
                    .unwrap_or_default(),
                _ => String::new(),
            }
        };
        let bos = token("tokenizer.ggml.bos_token_id");
        let eos = token("tokenizer.ggml.eos_token_id");
        Self::new(src, bos, eos).map(Some)
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn env() -> Environment<'static> {
        let mut env = Environment::new();
        // transformers renders chat templates with jinja2 `trim_blocks` and `lstrip_blocks`
        // on and the template's final newline dropped (jinja2's default); the same here, so
        // prompts are byte-identical to `apply_chat_template`.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        // Qwen3's and other templates call Python string methods (`startswith`, `strip`,
        // `split`, ...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env
    }

    /// Render a conversation. With `add_generation_prompt`, the text ends with the header
    /// of an assistant turn, ready for the model to continue.
    ///
    /// # Errors
    /// [`LmError::ChatTemplate`] when rendering fails (including `raise_exception` calls in
    /// the template).
    pub fn apply(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> LmResult<String> {
        let env = Self::env();
        let tmpl = env
            .template_from_str(&self.source)
            .map_err(|e| LmError::ChatTemplate(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| LmError::ChatTemplate(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let s = t.apply(&[ChatMessage::user("Hi")], true).unwrap();
        assert_eq!(s, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        assert!(ChatTemplate::new("{% if %}", "", "").is_err());
        let t = ChatTemplate::new("{{ raise_exception('no') }}", "", "").unwrap();
        assert!(matches!(t.apply(&[], false), Err(LmError::ChatTemplate(_))));
    }
}
