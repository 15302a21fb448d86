//! Chat templates: the Jinja template in the GGUF metadata, rendered with minijinja the
//! way Hugging Face's `apply_chat_template` does; ChatML when the file carries none.

use anyhow::{Context, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

impl ChatTemplate {
    pub fn new(source: Option<String>, bos: String, eos: String) -> Result<Self> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.unwrap_or_else(|| CHATML.to_string()))
            .context("the model's chat template does not parse")?;
        Ok(Self { env, bos, eos })
    }

    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        let tmpl = self.env.get_template("chat")?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| anyhow::anyhow!("chat template: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback_and_raise_exception() {
        let t = ChatTemplate::new(None, String::new(), String::new()).unwrap();
        let s = t
            .render(&[ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }])
            .unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        let strict = ChatTemplate::new(
            Some("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0].content.strip() }}".into()),
            String::new(),
            String::new(),
        )
        .unwrap();
        let err = strict
            .render(&[ChatMessage {
                role: "assistant".into(),
                content: "x".into(),
            }])
            .unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
        assert_eq!(
            strict
                .render(&[ChatMessage {
                    role: "user".into(),
                    content: " y ".into()
                }])
                .unwrap(),
            "y"
        );
    }
}
