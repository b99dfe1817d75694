//! Chat templates: turning an OpenAI-style message list into the prompt text a model was trained on.
//!
//! A GGUF carries its model's template as Jinja source (`tokenizer.chat_template`), written for
//! Hugging Face transformers' `apply_chat_template`, which renders it with Python's Jinja2. Our
//! prompt has to match that rendering byte for byte: a stray newline or a missing BOS moves the
//! model off the format it was trained on, and it answers worse without any error anywhere.
//!
//! Why minijinja: a pure-Rust implementation of Jinja2's language, so no Python and no second C++
//! engine. llama.cpp's `llama_chat_apply_template` (what llama-cpp-2 exposes) does not run the
//! Jinja at all; it guesses the format from marker strings and misses every template it does not
//! know. llama-server renders the Jinja itself (`--jinja`), as we do here.
//!
//! Why these environment settings: each reproduces transformers, which the templates were tested on.
//! - `trim_blocks` and `lstrip_blocks` on, as transformers sets them: templates indent their
//!   `{% %}` tags relying on both, or the prompt fills with indentation and blank lines.
//! - `keep_trailing_newline` off (Jinja2's default): a template file's final newline is not prompt.
//! - No autoescaping: a prompt is not HTML.
//! - `raise_exception(msg)`: how a template refuses a conversation ("roles must alternate"); it
//!   surfaces as [`ChatTemplateError::Render`] carrying the template's message.
//! - `strftime_now(format)`: transformers' local clock; Llama 3.2 prints today's date with it.
//! - minijinja-contrib's pycompat method callback: templates call Python methods (`.strip()`,
//!   `.startswith()`, `.split()`, `.items()`), which Jinja2 allows on its Python values.
//! - `tojson` replaced: transformers' is `json.dumps(ensure_ascii=False)` (`{"a": 1, "b": [2]}`),
//!   minijinja's writes `{"a":1,"b":[2]}` and escapes `<>&'` for HTML, which would alter tool
//!   schemas inside prompts.
//! - Undefined stays lenient (minijinja's and Jinja2's default): templates probe optional fields
//!   such as `message.tool_calls` by reading them.
//!
//! Messages reach the template as maps ordered `role`, `content`, as in the request JSON, so
//! `messages | tojson` and `message.items()` see what transformers would.
//!
//! Not supported: transformers' `{% generation %}` tag (training masks; not seen in GGUF templates).
//! A template using it fails in [`ChatTemplate::new`] as a syntax error.
//!
//! A model without a template (a base model) gets ChatML, as in llama-server, using llama.cpp's
//! own fallback text (`CHATML_TEMPLATE_SRC` in `common/chat.cpp`).

use std::fmt::{self, Write as _};
use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, Value, ValueKind};
use minijinja::{context, AutoEscape, Environment, Error, ErrorKind};

/// One message of a conversation, already flattened to text.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls, OpenAI-shaped, with each `function.arguments` decoded to an
    /// object when it is JSON text: templates iterate or `tojson` them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A tool result's call id and function name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into(), ..Default::default() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The template text does not compile.
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    /// Rendering failed (including a template's own raise_exception, e.g. "roles must alternate").
    #[error("chat template failed to render: {0}")]
    Render(String),
}

/// llama.cpp's fallback, verbatim, so a base model is prompted exactly as llama-server would.
const CHATML_TEMPLATE: &str = concat!(
    "{%- for message in messages -%}\n",
    "  {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}\n",
    "{%- endfor -%}\n",
    "{%- if add_generation_prompt -%}\n",
    "  {{- '<|im_start|>assistant\\n' -}}\n",
    "{%- endif -%}",
);

const TEMPLATE_NAME: &str = "chat_template";

/// Cheap to clone (Arc inside), Send + Sync: built once per loaded model, used from HTTP handlers.
#[derive(Clone)]
pub struct ChatTemplate {
    inner: Arc<Compiled>,
}

struct Compiled {
    env: Environment<'static>,
    source: String,
    bos_token: Value,
    eos_token: Value,
    fallback: bool,
}

// Handlers hold templates across awaits on a multi-threaded runtime; break the build, not a
// handler, if a field ever stops being shareable.
const _: fn() = || {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    shareable::<ChatTemplate>();
};

impl ChatTemplate {
    /// `source`: the GGUF's template text, or None for the ChatML fallback.
    /// `bos_token` / `eos_token`: the vocabulary's BOS/EOS token texts (e.g. `"<bos>"`, `"<eos>"`),
    /// exposed to the template.
    ///
    /// An empty template counts as none, as in llama.cpp; so does a blank one, which could only
    /// render whitespace.
    pub fn new(source: Option<&str>, bos_token: &str, eos_token: &str) -> Result<Self, ChatTemplateError> {
        match source {
            Some(text) if !text.trim().is_empty() => Self::compile(text.to_owned(), bos_token, eos_token, false),
            _ => Ok(Self::chatml(bos_token, eos_token)),
        }
    }

    /// The ChatML fallback template.
    pub fn chatml(bos_token: &str, eos_token: &str) -> Self {
        Self::compile(CHATML_TEMPLATE.to_owned(), bos_token, eos_token, true)
            .expect("the built-in ChatML template compiles")
    }

    fn compile(source: String, bos_token: &str, eos_token: &str, fallback: bool) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|err| ChatTemplateError::Syntax(err.to_string()))?;
        Ok(Self {
            inner: Arc::new(Compiled {
                env,
                source,
                bos_token: Value::from(bos_token),
                eos_token: Value::from(eos_token),
                fallback,
            }),
        })
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ChatTemplateError> {
        self.render_with_tools(messages, add_generation_prompt, None)
    }

    /// Renders with `tools` (OpenAI's tool list) defined for the template, as transformers and
    /// llama-server do; without them `tools` is undefined.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<String, ChatTemplateError> {
        let render_error = |err: Error| ChatTemplateError::Render(err.to_string());
        let template = self.inner.env.get_template(TEMPLATE_NAME).map_err(render_error)?;
        let messages: Vec<Value> = messages.iter().map(MessageObject::value).collect();
        let tools = tools.map_or(Value::UNDEFINED, Value::from_serialize);
        template
            .render(context! {
                messages => messages,
                tools => tools,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.inner.bos_token.clone(),
                eos_token => self.inner.eos_token.clone(),
            })
            .map_err(render_error)
    }

    /// Whether the template does anything with `tools`; if not, callers describe the tools in
    /// a system message themselves.
    pub fn mentions_tools(&self) -> bool {
        !self.inner.fallback && self.inner.source.contains("tools")
    }

    /// The template text in use (the fallback's text when falling back).
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// True when the model had no template and ChatML is used.
    pub fn is_fallback(&self) -> bool {
        self.inner.fallback
    }
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("fallback", &self.inner.fallback)
            .field("source_len", &self.inner.source.len())
            .finish()
    }
}

/// A message as the template sees it. A serde-built map is a BTreeMap unless minijinja's
/// `preserve_order` feature is on, and would put `content` before `role`.
#[derive(Debug)]
struct MessageObject {
    role: Value,
    content: Value,
    tool_calls: Option<Value>,
    tool_call_id: Option<Value>,
    name: Option<Value>,
    keys: &'static [&'static str],
}

impl MessageObject {
    fn value(message: &ChatMessage) -> Value {
        // Only the keys a message has are enumerated, so `'tool_calls' in message` is right.
        const KEYS: [&[&str]; 4] = [
            &["role", "content"],
            &["role", "content", "tool_calls"],
            &["role", "content", "tool_call_id", "name"],
            &["role", "content", "tool_calls", "tool_call_id", "name"],
        ];
        let calls = message.tool_calls.is_some();
        let result = message.tool_call_id.is_some() || message.name.is_some();
        Value::from_object(MessageObject {
            role: Value::from(message.role.as_str()),
            content: Value::from(message.content.as_str()),
            tool_calls: message.tool_calls.as_ref().map(Value::from_serialize),
            tool_call_id: message.tool_call_id.as_deref().map(Value::from),
            name: message.name.as_deref().map(Value::from),
            keys: KEYS[calls as usize + 2 * result as usize],
        })
    }
}

impl Object for MessageObject {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(self.role.clone()),
            "content" => Some(self.content.clone()),
            "tool_calls" => self.tool_calls.clone(),
            "tool_call_id" => self.tool_call_id.clone(),
            "name" => self.name.clone(),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(self.keys)
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: &str) -> Result<String, Error> {
    let mut out = String::new();
    // chrono reports an unknown specifier only as a formatting failure; to_string() would panic.
    write!(out, "{}", chrono::Local::now().format(format))
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, format!("strftime_now: unsupported format {format:?}")))?;
    Ok(out)
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, keyword arguments included.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(match v.as_str() {
            Some(text) => text.to_owned(),
            // Python treats a negative indent like 0: newlines, no indentation.
            None => " ".repeat(usize::try_from(i64::try_from(v)?.max(0)).unwrap_or(0)),
        }),
        None => None,
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(pair) => match <[String; 2]>::try_from(pair) {
            Ok([item, key]) => (item, key),
            Err(_) => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
        },
        // Python drops the space after ',' when indenting, so lines do not end in a blank.
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let dumper = JsonDump {
        indent,
        item_sep,
        key_sep,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    dumper.write(&mut out, value, 0)?;
    Ok(Value::from(out))
}

struct JsonDump {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonDump {
    fn write(&self, out: &mut String, value: &Value, depth: usize) -> Result<(), Error> {
        match value.kind() {
            // Jinja2 would refuse to serialize Undefined; null keeps a sloppy template working.
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
            ValueKind::Number => write_float(out, f64::try_from(value.clone())?),
            ValueKind::String => self.write_str(out, value.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.write_container(out, "[]", depth, &items, |out, item| self.write(out, item, depth + 1))?;
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    // Python writes int/bool keys as their text; templates only ever use strings.
                    entries.push((key.as_str().map_or_else(|| key.to_string(), str::to_owned), item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.write_container(out, "{}", depth, &entries, |out, (key, item)| {
                    self.write_str(out, key);
                    out.push_str(&self.key_sep);
                    self.write(out, item, depth + 1)
                })?;
            }
            kind => {
                let detail = format!("tojson: a {kind} value is not JSON serializable");
                return Err(Error::new(ErrorKind::InvalidOperation, detail));
            }
        }
        Ok(())
    }

    fn write_container<T>(
        &self,
        out: &mut String,
        brackets: &str,
        depth: usize,
        items: &[T],
        mut write_item: impl FnMut(&mut String, &T) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let (open, close) = brackets.split_at(1);
        out.push_str(open);
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            self.newline(out, depth + 1);
            write_item(out, item)?;
        }
        // Python writes empty containers as `[]` / `{}` even when indenting.
        if !items.is_empty() {
            self.newline(out, depth);
        }
        out.push_str(close);
        Ok(())
    }

    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    }

    fn write_str(&self, out: &mut String, text: &str) {
        out.push('"');
        for c in text.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if c < ' ' || (self.ensure_ascii && c > '~') => {
                    for unit in c.encode_utf16(&mut [0u16; 2]) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's float repr. Rust's Debug picks the same shortest digits and switches to exponent
/// form at the same magnitudes; only the exponent is spelled differently (1e16 vs 1e+16).
fn write_float(out: &mut String, f: f64) {
    let repr = match f {
        f if f.is_nan() => "NaN".to_owned(),
        f if f.is_infinite() => (if f > 0.0 { "Infinity" } else { "-Infinity" }).to_owned(),
        f => format!("{f:?}"),
    };
    match repr.split_once('e') {
        Some((mantissa, exp)) => {
            let (sign, digits) = exp.strip_prefix('-').map_or(("+", exp), |d| ("-", d));
            let _ = write!(out, "{mantissa}e{sign}{digits:0>2}");
        }
        None => out.push_str(&repr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage::new(role, content)
    }

    /// The conversation llama.cpp's tests/test-chat-template.cpp renders with every template, so
    /// its expected outputs apply unchanged. The padded reply shows which templates trim.
    fn llama_cpp_conversation() -> Vec<ChatMessage> {
        vec![
            msg("system", "You are a helpful assistant"),
            msg("user", "Hello"),
            msg("assistant", "Hi there"),
            msg("user", "Who are you"),
            msg("assistant", "   I am an assistant   "),
            msg("user", "Another question"),
        ]
    }

    fn system_and_user() -> Vec<ChatMessage> {
        vec![msg("system", "You are a helpful assistant"), msg("user", "Hello")]
    }

    fn render(source: &str, bos: &str, eos: &str, messages: &[ChatMessage], add_generation_prompt: bool) -> String {
        let template = ChatTemplate::new(Some(source), bos, eos).expect("template compiles");
        assert!(!template.is_fallback());
        assert_eq!(template.source(), source);
        template.render(messages, add_generation_prompt).expect("template renders")
    }

    fn render_error(source: &str, messages: &[ChatMessage]) -> String {
        match ChatTemplate::new(Some(source), "<s>", "</s>").unwrap().render(messages, true) {
            Err(err @ ChatTemplateError::Render(_)) => err.to_string(),
            other => panic!("expected a render error, got {other:?}"),
        }
    }

    #[test]
    fn missing_template_falls_back_to_llama_cpp_chatml() {
        let messages = [msg("system", "Be brief."), msg("user", " Hi\n"), msg("assistant", "Hi!"), msg("user", "Bye")];
        let expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n Hi\n<|im_end|>\n\
                        <|im_start|>assistant\nHi!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
                        <|im_start|>assistant\n";
        // An empty template could only render an empty prompt; llama.cpp treats it as missing too.
        for source in [None, Some(""), Some("  \n")] {
            let template = ChatTemplate::new(source, "<s>", "</s>").unwrap();
            assert!(template.is_fallback(), "{source:?}");
            assert_eq!(template.source(), CHATML_TEMPLATE);
            assert_eq!(template.render(&messages, true).unwrap(), expected);
        }
        assert!(ChatTemplate::chatml("", "").is_fallback());
        assert_eq!(ChatTemplate::chatml("", "").clone().render(&messages, true).unwrap(), expected);
    }

    #[test]
    fn add_generation_prompt_false_leaves_no_assistant_header() {
        let user = [msg("user", "Hello")];
        assert_eq!(ChatTemplate::chatml("", "").render(&user, false).unwrap(), "<|im_start|>user\nHello<|im_end|>\n");
        assert_eq!(render(GEMMA_3, "<bos>", "<eos>", &user, false), "<bos><start_of_turn>user\nHello<end_of_turn>\n");
        assert_eq!(
            render(QWEN_2_5, "", "<|im_end|>", &user, false),
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHello<|im_end|>\n"
        );
    }

    #[test]
    fn gemma_3_folds_the_system_message_into_the_first_user_turn() {
        assert_eq!(
            render(GEMMA_3, "<bos>", "<eos>", &system_and_user(), true),
            "<bos><start_of_turn>user\nYou are a helpful assistant\n\nHello<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn gemma_3_calls_the_assistant_model_and_trims_turns() {
        assert_eq!(
            render(GEMMA_3, "<bos>", "<eos>", &llama_cpp_conversation(), true),
            "<bos><start_of_turn>user\nYou are a helpful assistant\n\nHello<end_of_turn>\n\
             <start_of_turn>model\nHi there<end_of_turn>\n\
             <start_of_turn>user\nWho are you<end_of_turn>\n\
             <start_of_turn>model\nI am an assistant<end_of_turn>\n\
             <start_of_turn>user\nAnother question<end_of_turn>\n\
             <start_of_turn>model\n"
        );
    }

    #[test]
    fn llama_3_matches_llama_cpp_expected_output() {
        // test-chat-template.cpp, case "Llama-3" (bos and eos empty there).
        assert_eq!(
            render(LLAMA_3, "", "", &llama_cpp_conversation(), true),
            "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nI am an assistant<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nAnother question<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let with_bos = render(LLAMA_3, "<|begin_of_text|>", "<|eot_id|>", &system_and_user(), true);
        assert!(with_bos.starts_with("<|begin_of_text|><|start_header_id|>system"), "{with_bos:?}");
        assert_eq!(with_bos.matches("<|begin_of_text|>").count(), 1, "BOS belongs to the first turn only");
    }

    #[test]
    fn qwen_2_5_renders_tools_calls_and_results_as_transformers_does() {
        let tools = serde_json::json!([{ "type": "function", "function": { "name": "get_weather", "parameters": {
            "type": "object", "properties": { "city": { "type": "string" } }, "required": ["city"] } } }]);
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = Some(serde_json::json!([{ "id": "call_1", "type": "function",
            "function": { "name": "get_weather", "arguments": { "city": "Paris" } } }]));
        let mut result = ChatMessage::new("tool", "21 degrees");
        result.tool_call_id = Some("call_1".into());
        let messages = [msg("user", "Weather in Paris?"), call, result];
        let template = ChatTemplate::new(Some(QWEN_2_5), "", "<|im_end|>").unwrap();
        assert!(template.mentions_tools());
        let out = template.render_with_tools(&messages, true, Some(&tools)).unwrap();
        let expected = concat!(
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n",
            "You may call one or more functions to assist with the user query.\n\n",
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
            r#"{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}"#,
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments within ",
            "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n",
            "</tool_call><|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n",
            r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#,
            "\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n21 degrees\n</tool_response><|im_end|>\n",
            "<|im_start|>assistant\n",
        );
        assert_eq!(out, expected);
        // Without tools the same template takes its other branch.
        let plain = template.render(&messages[..1], true).unwrap();
        assert!(!plain.contains("<tools>") && plain.starts_with("<|im_start|>system\nYou are Qwen"), "{plain}");
    }

    #[test]
    fn llama_3_1_family_writes_its_dated_system_header() {
        assert_eq!(
            render(LLAMA_3_3, "<|begin_of_text|>", "<|eot_id|>", &system_and_user(), true),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
             Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n\
             You are a helpful assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn llama_3_2_dates_its_system_header_with_strftime_now() {
        let expected = |date: String| {
            format!(
                "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
                 Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n<|eot_id|>\
                 <|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>\
                 <|start_header_id|>assistant<|end_header_id|>\n\n"
            )
        };
        let today = || chrono::Local::now().format("%d %b %Y").to_string();
        let before = expected(today());
        let prompt = render(LLAMA_3_2, "<|begin_of_text|>", "<|eot_id|>", &[msg("user", "Hello")], true);
        // Midnight may pass during the render.
        assert!(prompt == before || prompt == expected(today()), "{prompt:?}");
        assert!(render_error("{{ strftime_now('%Q') }}", &[]).contains("%Q"));
    }

    #[test]
    fn qwen_2_5_adds_its_default_system_prompt() {
        assert_eq!(
            render(QWEN_2_5, "", "<|im_end|>", &[msg("user", "Hello")], true),
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn qwen_2_5_keeps_a_given_system_prompt_and_untrimmed_turns() {
        assert_eq!(
            render(QWEN_2_5, "", "<|im_end|>", &llama_cpp_conversation(), true),
            "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n\
             <|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you<|im_end|>\n\
             <|im_start|>assistant\n   I am an assistant   <|im_end|>\n<|im_start|>user\nAnother question<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn mistral_v1_matches_llama_cpp_expected_output() {
        // test-chat-template.cpp, case "mistralai 'v1' template with a system prompt".
        assert_eq!(
            render(MIXTRAL_8X7B, "", "</s>", &llama_cpp_conversation(), true),
            " [INST] You are a helpful assistant\n\nHello [/INST] Hi there</s> [INST] Who are you [/INST]    \
             I am an assistant   </s> [INST] Another question [/INST]"
        );
    }

    #[test]
    fn mistral_nemo_matches_llama_cpp_expected_output() {
        // test-chat-template.cpp, case "Mistral-Nemo-Instruct-2407", Jinja expectation: the system
        // prompt rides on the last user turn.
        assert_eq!(
            render(MISTRAL_NEMO, "", "</s>", &llama_cpp_conversation(), true),
            "[INST]Hello[/INST]Hi there</s>[INST]Who are you[/INST]   I am an assistant   </s>\
             [INST]You are a helpful assistant\n\nAnother question[/INST]"
        );
    }

    #[test]
    fn mistral_refuses_non_alternating_roles_with_its_own_message() {
        let message =
            "After the optional system message, conversation roles must alternate user/assistant/user/assistant/...";
        for source in [MIXTRAL_8X7B, MISTRAL_NEMO] {
            let text = render_error(source, &[msg("user", "one"), msg("user", "two")]);
            assert!(text.contains(message), "{text}");
        }
    }

    #[test]
    fn syntax_errors_surface_when_the_template_is_built() {
        for broken in ["{% for m in messages %}{{ m.content }}", "{{ messages[0].content ", "{% if %}x{% endif %}"] {
            match ChatTemplate::new(Some(broken), "", "") {
                Err(ChatTemplateError::Syntax(text)) => assert!(!text.is_empty()),
                other => panic!("{broken:?}: expected a syntax error, got {other:?}"),
            }
        }
    }

    #[test]
    fn whitespace_control_matches_transformers() {
        // Indented block tags vanish with their line (lstrip_blocks + trim_blocks), and the
        // file's final newline is dropped (keep_trailing_newline off).
        let source =
            "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}\nend\n";
        let messages = [msg("user", "a"), msg("system", "s"), msg("user", "b")];
        assert_eq!(render(source, "", "", &messages, true), "U:a\nU:b\nend");
    }

    #[test]
    fn python_methods_and_loop_controls_work() {
        let source = "{{ messages[0].content.strip().split(',') | join('|') }}\
                      {% if messages[0].role.startswith('us') %}!{% endif %}\
                      {% for key, value in messages[0].items() %} {{ key }}{% endfor %}\
                      {% for m in messages %}{% if loop.index0 > 0 %}{% break %}{% endif %}\
                      {{ ' ' + m.role.upper() }}{% endfor %}";
        let messages = [msg("user", "  a,b ,c \n"), msg("system", "x")];
        assert_eq!(render(source, "", "", &messages, true), "a|b |c! role content USER");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let cases = [
            // Python's separators, insertion order, no HTML escaping, non-ASCII kept.
            ("{{ messages | tojson }}", r#"[{"role": "user", "content": "<b> \"q\" & 'é'\n"}]"#),
            ("{{ messages[0] | tojson(sort_keys=true) }}", r#"{"content": "<b> \"q\" & 'é'\n", "role": "user"}"#),
            ("{{ messages[0].content | tojson(ensure_ascii=true) }}", r#""<b> \"q\" & '\u00e9'\n""#),
            (
                "{{ {'a': [1, 2.5, none, true], 'b': {}} | tojson(indent=2) }}",
                "{\n  \"a\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"b\": {}\n}",
            ),
            ("{{ [1, 2] | tojson(separators=[',', ':']) }}", "[1,2]"),
            ("{{ [1.0, 0.0001, 0.00001, 1e16, 1e15] | tojson }}", "[1.0, 0.0001, 1e-05, 1e+16, 1000000000000000.0]"),
        ];
        for (source, expected) in cases {
            assert_eq!(render(source, "", "", &[msg("user", "<b> \"q\" & 'é'\n")], true), expected, "{source}");
        }
    }

    // Real model templates, verbatim.

    // google/gemma-3 `tokenizer_config.json` "chat_template", as quoted in ShishirPatil/gorilla
    // berkeley-function-call-leaderboard/bfcl/model_handler/local_inference/gemma.py (same text as the
    // gemma-3-270m-it GGUF's `tokenizer.chat_template`). Note the real newlines inside '...' literals.
    const GEMMA_3: &str = r##"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"##;

    // Meta-Llama-3-8B-Instruct, from ggml-org/llama.cpp tests/test-chat-template.cpp, case "Llama-3".
    const LLAMA_3: &str = r##"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>

'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>

' }}"##;

    // ggerganov/llama.cpp tests/chat/templates/meta-llama-Llama-3.3-70B-Instruct.jinja (Llama 3.1 family: dated system header).
    const LLAMA_3_3: &str = r##"{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"##;

    // ggerganov/llama.cpp models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja
    const LLAMA_3_2: &str = r##"{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"##;

    // ggerganov/llama.cpp tests/chat/templates/Qwen-Qwen2.5-7B-Instruct.jinja
    const QWEN_2_5: &str = r##"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"##;

    // ggerganov/llama.cpp tests/chat/templates/mistralai-Mixtral-8x7B-Instruct-v0.1.jinja (Mistral's "v1" template).
    const MIXTRAL_8X7B: &str = r##"{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"##;

    // ggerganov/llama.cpp models/templates/mistralai-Mistral-Nemo-Instruct-2407.jinja
    const MISTRAL_NEMO: &str = r##"{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS][" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST]" + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST]" + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif (message.tool_calls is defined and message.tool_calls is not none) %}
        {{- "[TOOL_CALLS][" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- message["content"] + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS]{"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"##;
}
