//! OpenAI `tools` / `tool_choice` for any GGUF model.
//!
//! Templates that know tools get [`ValidTools::openai_tools_json`]; the rest get
//! [`ValidTools::system_prompt`], which teaches llama.cpp's "generic" JSON format. `required` and a named
//! choice are enforced with [`ValidTools::grammar_schema`], which always uses the generic format, so a
//! constrained answer is always a call. [`ValidTools::parse`] reads the generic format and the native
//! formats models fall back to, because a model with a tool-aware template answers in its own dialect.

use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use utoipa::ToSchema;

/// One entry of the request's `tools`; not `deny_unknown_fields`, because clients extend it.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ToolIn {
    /// Only `"function"` exists; any other type is refused while the body is read.
    #[serde(rename = "type")]
    #[allow(dead_code)] // parsing it is the check
    pub kind: FunctionKind,
    pub function: FunctionIn,
}

/// The one tool type OpenAI chat completions define.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FunctionKind {
    Function,
}

/// OpenAI's function object; closed, so typos (`paramters`) are refused rather than silently ignored.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionIn {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Option<Value>,
    /// Accepted and ignored: `required`/named calls are grammar-constrained regardless, `auto` ones never are.
    #[allow(dead_code)]
    pub strict: Option<bool>,
}

/// The request's `tool_choice`: a mode string or a named function.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(
    untagged,
    expecting = r#"tool_choice must be "none", "auto", "required" or {"type":"function","function":{"name":"..."}}"#
)]
pub enum ToolChoiceIn {
    Mode(ToolMode),
    Named(NamedChoice),
}

/// The string forms of `tool_choice`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ToolMode {
    None,
    Auto,
    Required,
}

/// `{"type":"function","function":{"name":...}}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NamedChoice {
    #[serde(rename = "type")]
    #[allow(dead_code)] // parsing it is the check
    pub kind: FunctionKind,
    pub function: NamedFunction,
}

/// The function named by a [`NamedChoice`].
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NamedFunction {
    pub name: String,
}

/// A refused `tools`/`tool_choice`; `param` is OpenAI's error `param`, so clients can point at the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolError {
    pub param: &'static str,
    pub message: String,
}

impl std::fmt::Display for ToolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ToolError {}

fn err(param: &'static str, message: String) -> ToolError {
    ToolError { param, message }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choice {
    Auto,
    Required,
    /// Index into `ValidTools::tools`.
    Named(usize),
}

#[derive(Debug, Clone)]
struct Tool {
    name: String,
    description: Option<String>,
    /// Always a JSON object with `"type": "object"` (filled in when the client omitted it).
    parameters: Value,
}

/// Tools that passed [`validate`] and are to be offered to the model.
#[derive(Debug, Clone)]
pub struct ValidTools {
    tools: Vec<Tool>,
    choice: Choice,
    parallel: bool,
}

/// A tool call recognised in the model's output; serializes as OpenAI's `{"id","type","function"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// `call_` + 24 random alphanumerics, like OpenAI's ids.
    pub id: String,
    pub name: String,
    /// Compact JSON text of an object: OpenAI sends arguments as a string.
    pub arguments: String,
}

impl ToolCall {
    fn new(name: &str, arguments: String) -> Self {
        let id: String = std::iter::repeat_with(fastrand::alphanumeric).take(24).collect();
        ToolCall { id: format!("call_{id}"), name: name.to_string(), arguments }
    }
}

impl Serialize for ToolCall {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Function<'a> {
            name: &'a str,
            arguments: &'a str,
        }
        #[derive(Serialize)]
        struct Call<'a> {
            id: &'a str,
            #[serde(rename = "type")]
            kind: &'static str,
            function: Function<'a>,
        }
        Call { id: &self.id, kind: "function", function: Function { name: &self.name, arguments: &self.arguments } }
            .serialize(s)
    }
}

/// The assistant message recovered from generated text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedOutput {
    /// `None` only when calls were found and nothing else was said (OpenAI sends `content: null` then).
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCall>,
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Why not: empty or invalid name (OpenAI's `^[a-zA-Z0-9_-]{1,64}$`), duplicate, or non-object parameters.
fn check_tool(i: usize, f: FunctionIn, seen: &[Tool]) -> Result<Tool, String> {
    let FunctionIn { name, description, parameters, .. } = f;
    let at = format!("tools[{i}].function");
    if name.is_empty() {
        return Err(format!("{at}.name must not be empty"));
    }
    if !valid_name(&name) {
        return Err(format!("{at}.name {name:?} is invalid: use 1-64 characters of a-z, A-Z, 0-9, _ and -"));
    }
    if seen.iter().any(|t| t.name == name) {
        return Err(format!("{at}.name {name:?} is used by more than one tool"));
    }
    let parameters = match parameters {
        None | Some(Value::Null) => serde_json::json!({"type": "object", "properties": {}}),
        Some(Value::Object(mut schema)) => {
            // `{}` is common for argument-less functions; the grammar needs the type to emit an object.
            let kind = schema.entry("type").or_insert_with(|| "object".into());
            if *kind != "object" {
                return Err(format!("{at}.parameters must have \"type\": \"object\", got {kind}"));
            }
            Value::Object(schema)
        }
        Some(_) => return Err(format!("{at}.parameters must be a JSON Schema object")),
    };
    Ok(Tool { name, description, parameters })
}

/// Checks `tools`/`tool_choice` as OpenAI does and decides what to do with them.
///
/// `Ok(None)` means "no tools this request": none were given, or `tool_choice` is `"none"`. With
/// `"none"` the tools are dropped entirely rather than shown to the model with an instruction not to use
/// them, since small models call tools they can see regardless. Tools are still validated first, so a
/// malformed request fails the same way whatever the choice. The default choice is `auto`, as in
/// OpenAI; `parallel_tool_calls` defaults to false, as in llama-server: offered a list, small
/// models repeat the same call until `max_tokens` cuts the JSON off.
pub fn validate(
    tools: Option<Vec<ToolIn>>,
    choice: Option<ToolChoiceIn>,
    parallel_tool_calls: Option<bool>,
) -> Result<Option<ValidTools>, ToolError> {
    let mut valid: Vec<Tool> = Vec::new();
    for (i, tool) in tools.unwrap_or_default().into_iter().enumerate() {
        let tool = check_tool(i, tool.function, &valid).map_err(|m| err("tools", m))?;
        valid.push(tool);
    }
    let choice = match choice {
        None | Some(ToolChoiceIn::Mode(ToolMode::Auto)) => Choice::Auto,
        Some(ToolChoiceIn::Mode(ToolMode::None)) => return Ok(None),
        Some(ToolChoiceIn::Mode(ToolMode::Required)) if !valid.is_empty() => Choice::Required,
        Some(ToolChoiceIn::Mode(ToolMode::Required)) => {
            return Err(err("tool_choice", "tool_choice \"required\" needs at least one tool in \"tools\"".into()))
        }
        Some(ToolChoiceIn::Named(NamedChoice { function: NamedFunction { name }, .. })) => {
            let missing = if valid.is_empty() { "but no tools were given" } else { "which is not in \"tools\"" };
            let i = valid.iter().position(|t| t.name == name);
            Choice::Named(
                i.ok_or_else(|| err("tool_choice", format!("tool_choice names function {name:?}, {missing}")))?,
            )
        }
    };
    if valid.is_empty() {
        return Ok(None);
    }
    Ok(Some(ValidTools { tools: valid, choice, parallel: parallel_tool_calls.unwrap_or(false) }))
}

enum Hit {
    Calls(Vec<ToolCall>),
    Response(String),
}

/// The first JSON value at the start of `s` (after whitespace) and the text after it.
fn leading_json(s: &str) -> Option<(Value, &str)> {
    let s = s.trim_start();
    if !s.starts_with(['{', '[']) {
        return None;
    }
    let mut values = serde_json::Deserializer::from_str(s).into_iter::<Value>();
    let value = values.next()?.ok()?;
    Some((value, s.get(values.byte_offset()..)?))
}

fn non_blank(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

impl ValidTools {
    /// The tools in OpenAI's shape for a template's `tools` variable. `parameters` is always present so
    /// templates that read `tool.function.parameters.properties` don't fail on argument-less functions.
    pub fn openai_tools_json(&self) -> Value {
        let tools = self.tools.iter().map(|t| {
            let mut function = serde_json::Map::new();
            function.insert("name".into(), t.name.clone().into());
            if let Some(d) = &t.description {
                function.insert("description".into(), d.clone().into());
            }
            function.insert("parameters".into(), t.parameters.clone());
            serde_json::json!({"type": "function", "function": function})
        });
        Value::Array(tools.collect())
    }

    /// Instructions for a template that ignores `tools`, to be added to (or merged into) the system
    /// message. It describes the same JSON format that [`ValidTools::grammar_schema`] enforces and that
    /// [`ValidTools::parse`] reads first.
    pub fn system_prompt(&self) -> String {
        let mut s = String::from("You have access to the following tools:\n");
        for t in &self.tools {
            s += &format!("\n- {}", t.name);
            if let Some(d) = t.description.as_deref().filter(|d| !d.trim().is_empty()) {
                s += &format!(": {}", d.trim());
            }
            s += &format!("\n  Arguments (JSON Schema): {}\n", t.parameters);
        }
        let call = r#"{"name": "<tool name>", "arguments": {<arguments as JSON>}}"#;
        let call = if self.parallel {
            format!("{{\"tool_calls\": [{call}]}}\n(one or more calls in the list)")
        } else {
            format!("{{\"tool_call\": {call}}}")
        };
        let only = "Respond with a single JSON object and nothing else";
        s += &match self.choice {
            Choice::Auto => {
                let reply = r#"{"response": "<your reply>"}"#;
                format!("\n{only}. To call tools, use\n{call}\nTo reply to the user directly, use\n{reply}")
            }
            Choice::Required => format!("\nYou must call a tool. {only}:\n{call}"),
            Choice::Named(i) => {
                let name = self.tools.get(i).map_or("", |t| t.name.as_str());
                format!("\nYou must call the tool \"{name}\". {only}:\n{call}")
            }
        };
        s
    }

    /// For `required` or a named choice: the JSON Schema (as JSON text) of the whole constrained answer,
    /// for llama.cpp's `json_schema_to_grammar`. `None` for `auto`, which must leave the model free.
    ///
    /// Returned as text, not a `Value`, for key order: without serde_json's `preserve_order` (paddock
    /// doesn't enable it) a `Map` is sorted, which puts `"arguments"` before `"name"`. llama.cpp reads the
    /// schema with ordered JSON and emits properties in text order, so the model would have to write the
    /// arguments before picking the tool. This text lists `name` first. Each tool's own `parameters` still
    /// comes from a `Value`, so its properties are in alphabetical order (the client's order was already
    /// lost when the request was deserialized).
    pub fn grammar_schema(&self) -> Option<String> {
        let item = |t: &Tool| {
            format!(
                concat!(
                    r#"{{"type":"object","properties":{{"name":{{"type":"string","const":{}}},"arguments":{}}},"#,
                    r#""required":["name","arguments"],"additionalProperties":false}}"#
                ),
                Value::String(t.name.clone()),
                t.parameters
            )
        };
        let call = match self.choice {
            Choice::Auto => return None,
            Choice::Named(i) => item(self.tools.get(i)?),
            Choice::Required if self.tools.len() == 1 => item(self.tools.first()?),
            Choice::Required => {
                format!(r#"{{"anyOf":[{}]}}"#, self.tools.iter().map(item).collect::<Vec<_>>().join(","))
            }
        };
        let (key, value) = if self.parallel {
            ("tool_calls", format!(r#"{{"type":"array","items":{call},"minItems":1}}"#))
        } else {
            ("tool_call", call)
        };
        Some(format!(
            r#"{{"type":"object","properties":{{"{key}":{value}}},"required":["{key}"],"additionalProperties":false}}"#
        ))
    }

    /// Splits generated text into content and tool calls. Formats, first match wins: generic
    /// (`tool_call`/`tool_calls`/`response`) or a bare call object at the start; Hermes/Qwen
    /// `<tool_call>` blocks; Llama `<|python_tag|>`; Mistral `[TOOL_CALLS]` (array, or the newer
    /// `name[ARGS]{...}`); the first fenced ```` ```json ```` block. Calls must name a given tool and carry object
    /// arguments, else the text is content untouched. With `parallel_tool_calls: false`, only the first
    /// call is kept. Arguments are re-serialized compactly, so their keys come out in alphabetical order.
    pub fn parse(&self, text: &str) -> ParsedOutput {
        let found = self
            .leading(text)
            .or_else(|| self.hermes(text))
            .or_else(|| self.python_tag(text))
            .or_else(|| self.mistral(text))
            .or_else(|| self.fenced(text));
        match found {
            Some(mut out) => {
                if !self.parallel {
                    out.tool_calls.truncate(1);
                }
                out
            }
            None => ParsedOutput { content: Some(text.to_string()), tool_calls: Vec::new() },
        }
    }

    fn call(&self, v: &Value) -> Option<ToolCall> {
        let obj = v.as_object()?;
        // OpenAI's own shape, which models trained on API logs sometimes echo.
        if let Some(f @ Value::Object(_)) = obj.get("function") {
            return self.call(f);
        }
        let name = obj.get("name")?.as_str()?;
        if !self.tools.iter().any(|t| t.name == name) {
            return None;
        }
        let arguments = match obj.get("arguments").or_else(|| obj.get("parameters")) {
            None | Some(Value::Null) => "{}".to_string(),
            Some(args @ Value::Object(_)) => args.to_string(),
            Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                Ok(args @ Value::Object(_)) => args.to_string(),
                _ => return None,
            },
            Some(_) => return None,
        };
        Some(ToolCall::new(name, arguments))
    }

    fn calls(&self, items: &[Value]) -> Option<Vec<ToolCall>> {
        if items.is_empty() {
            return None;
        }
        items.iter().map(|v| self.call(v)).collect()
    }

    fn interpret(&self, v: &Value) -> Option<Hit> {
        if let Value::Array(items) = v {
            return self.calls(items).map(Hit::Calls);
        }
        let obj = v.as_object()?;
        if obj.len() == 1 {
            if let Some(call) = obj.get("tool_call") {
                return self.call(call).map(|c| Hit::Calls(vec![c]));
            }
            if let Some(calls) = obj.get("tool_calls") {
                return self.calls(calls.as_array()?).map(Hit::Calls);
            }
            if let Some(r) = obj.get("response") {
                return Some(Hit::Response(r.as_str().map_or_else(|| r.to_string(), str::to_string)));
            }
        }
        self.call(v).map(|c| Hit::Calls(vec![c]))
    }

    fn outcome(&self, before: &str, v: &Value, after: &str) -> Option<ParsedOutput> {
        Some(match self.interpret(v)? {
            Hit::Calls(tool_calls) => ParsedOutput { content: non_blank(&format!("{before}{after}")), tool_calls },
            Hit::Response(r) if before.trim().is_empty() && after.trim().is_empty() => {
                ParsedOutput { content: Some(r), tool_calls: Vec::new() }
            }
            Hit::Response(r) => {
                ParsedOutput { content: non_blank(&format!("{before}{r}{after}")), tool_calls: Vec::new() }
            }
        })
    }

    fn leading(&self, text: &str) -> Option<ParsedOutput> {
        let (v, after) = leading_json(text)?;
        self.outcome("", &v, after)
    }

    fn hermes(&self, text: &str) -> Option<ParsedOutput> {
        const OPEN: &str = "<tool_call>";
        const CLOSE: &str = "</tool_call>";
        let (mut content, mut tool_calls, mut rest) = (String::new(), Vec::new(), text);
        while let Some((before, inner)) = rest.split_once(OPEN) {
            content += before;
            // An unclosed last block happens when generation stops on the closing tag.
            let (body, next, close) = inner.split_once(CLOSE).map_or((inner, "", ""), |(b, n)| (b, n, CLOSE));
            match serde_json::from_str::<Value>(body.trim()).ok().and_then(|v| self.call(&v)) {
                Some(c) => tool_calls.push(c),
                None => content += &format!("{OPEN}{body}{close}"),
            }
            rest = next;
        }
        if tool_calls.is_empty() {
            return None;
        }
        content += rest;
        Some(ParsedOutput { content: non_blank(&content), tool_calls })
    }

    fn python_tag(&self, text: &str) -> Option<ParsedOutput> {
        let (before, after) = text.split_once("<|python_tag|>")?;
        let (v, rest) = leading_json(after)?;
        self.outcome(before, &v, rest)
    }

    fn mistral(&self, text: &str) -> Option<ParsedOutput> {
        let mut parts = text.split("[TOOL_CALLS]");
        let mut content = parts.next()?.to_string();
        let mut tool_calls = Vec::new();
        for part in parts {
            let rest = if let Some((v, rest)) = leading_json(part) {
                tool_calls.extend(match self.interpret(&v)? {
                    Hit::Calls(calls) => calls,
                    Hit::Response(_) => return None,
                });
                rest
            } else {
                let (name, args) = part.split_once("[ARGS]")?;
                let (args, rest) = leading_json(args)?;
                tool_calls.push(self.call(&serde_json::json!({"name": name.trim(), "arguments": args}))?);
                rest
            };
            content += rest;
        }
        if tool_calls.is_empty() {
            return None;
        }
        Some(ParsedOutput { content: non_blank(&content), tool_calls })
    }

    fn fenced(&self, text: &str) -> Option<ParsedOutput> {
        let (before, open) = text.split_once("```")?;
        let (tag, body) = open.split_once('\n')?;
        if !(tag.trim().is_empty() || tag.trim().eq_ignore_ascii_case("json")) {
            return None;
        }
        let (body, after) = body.split_once("```")?;
        let v = serde_json::from_str::<Value>(body.trim()).ok()?;
        self.outcome(before, &v, after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools_in(v: Value) -> Vec<ToolIn> {
        serde_json::from_value(v).expect("tools")
    }

    fn weather_and_time() -> Vec<ToolIn> {
        tools_in(json!([
            {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "get_time"}}
        ]))
    }

    fn choice(v: Value) -> Option<ToolChoiceIn> {
        Some(serde_json::from_value(v).expect("choice"))
    }

    /// Parallel calls unless told otherwise: most parsing tests cover lists of calls.
    fn valid(choice_v: Option<Value>, parallel: Option<bool>) -> ValidTools {
        validate(Some(weather_and_time()), choice_v.and_then(choice), parallel.or(Some(true)))
            .expect("valid")
            .expect("some")
    }

    fn error_of(tools: Value, choice_v: Option<Value>) -> ToolError {
        validate(Some(tools_in(tools)), choice_v.and_then(choice), None).expect_err("should fail")
    }

    fn one(name: &str, params: Value) -> Value {
        json!([{"type": "function", "function": {"name": name, "parameters": params}}])
    }

    #[test]
    fn request_types_refuse_what_openai_refuses() {
        assert!(serde_json::from_value::<ToolIn>(json!({"type": "web_search", "function": {"name": "a"}})).is_err());
        assert!(serde_json::from_value::<ToolIn>(
            json!({"type": "function", "function": {"name": "a", "paramters": {}}})
        )
        .is_err());
        assert!(serde_json::from_value::<ToolIn>(json!({"type": "function", "x-extra": 1, "function": {"name": "a"}}))
            .is_ok());
        assert!(serde_json::from_value::<ToolChoiceIn>(json!("sometimes")).is_err());
        assert!(serde_json::from_value::<ToolChoiceIn>(json!({"type": "function", "name": "a"})).is_err());
        assert!(matches!(choice(json!("required")), Some(ToolChoiceIn::Mode(ToolMode::Required))));
    }

    #[test]
    fn validation_errors_name_the_problem() {
        let e = error_of(one("", json!({"type": "object"})), None);
        assert_eq!((e.param, e.message.contains("must not be empty")), ("tools", true));
        let e = error_of(one("get weather", json!({"type": "object"})), None);
        assert!(e.message.contains("\"get weather\" is invalid"), "{e}");
        assert!(error_of(one(&"a".repeat(65), json!({})), None).message.contains("is invalid"));
        let dup =
            json!([{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}]);
        assert!(error_of(dup, None).message.contains("more than one tool"));
        assert!(error_of(one("a", json!("x")), None).message.contains("must be a JSON Schema object"));
        assert!(error_of(one("a", json!({"type": "array"})), None).message.contains("\"type\": \"object\""));
        let e =
            error_of(one("get_weather", json!({})), Some(json!({"type": "function", "function": {"name": "nope"}})));
        assert_eq!(e.param, "tool_choice");
        assert!(e.message.contains("\"nope\""));
        let e = validate(None, choice(json!("required")), None).expect_err("required without tools");
        assert_eq!(e.param, "tool_choice");
        let e = validate(Some(vec![]), choice(json!({"type": "function", "function": {"name": "a"}})), None);
        assert_eq!(e.expect_err("named without tools").param, "tool_choice");
    }

    #[test]
    fn nothing_to_do_gives_none() {
        assert!(validate(None, None, None).expect("ok").is_none());
        assert!(validate(Some(vec![]), choice(json!("auto")), None).expect("ok").is_none());
        assert!(validate(Some(weather_and_time()), choice(json!("none")), None).expect("ok").is_none());
        // Tools are checked even when they won't be used.
        assert!(validate(Some(tools_in(one("", json!({})))), choice(json!("none")), None).is_err());
    }

    #[test]
    fn template_json_is_openai_shaped_with_parameters_filled_in() {
        let v = valid(None, None).openai_tools_json();
        assert_eq!(v[0]["function"]["name"], "get_weather");
        assert_eq!(v[0]["type"], "function");
        assert_eq!(v[1]["function"]["parameters"], json!({"type": "object", "properties": {}}));
        assert!(v[1]["function"].get("description").is_none());
        let t = validate(Some(tools_in(one("a", json!({})))), None, None).expect("ok").expect("some");
        assert_eq!(t.openai_tools_json()[0]["function"]["parameters"], json!({"type": "object"}));
    }

    #[test]
    fn system_prompt_matches_choice() {
        let auto = valid(None, Some(false)).system_prompt();
        assert!(auto.contains("get_weather: Weather for a city") && auto.contains(r#""required":["city"]"#));
        assert!(auto.contains(r#"{"tool_call": "#) && auto.contains(r#"{"response": "#));
        let parallel = valid(None, Some(true)).system_prompt();
        let default = validate(Some(weather_and_time()), None, None).expect("valid").expect("some").system_prompt();
        assert!(default.contains(r#"{"tool_call": "#), "parallel calls are off unless asked for");
        assert!(parallel.contains(r#"{"tool_calls": ["#) && !parallel.contains(r#"{"tool_call": "#));
        let required = valid(Some(json!("required")), None).system_prompt();
        assert!(required.contains("must call a tool") && !required.contains("response"));
        let named = valid(Some(json!({"type": "function", "function": {"name": "get_time"}})), None).system_prompt();
        assert!(named.contains("must call the tool \"get_time\"") && !named.contains("response"));
    }

    fn schema(t: &ValidTools) -> Value {
        serde_json::from_str(&t.grammar_schema().expect("schema")).expect("valid JSON")
    }

    #[test]
    fn grammar_schema_shapes() {
        assert!(valid(None, None).grammar_schema().is_none());
        let named = valid(Some(json!({"type": "function", "function": {"name": "get_weather"}})), Some(false));
        let s = schema(&named);
        assert_eq!(s["required"], json!(["tool_call"]));
        let call = &s["properties"]["tool_call"];
        assert_eq!(call["properties"]["name"]["const"], "get_weather");
        assert_eq!(call["properties"]["arguments"]["required"], json!(["city"]));
        assert_eq!(call["required"], json!(["name", "arguments"]));

        let s = schema(&valid(Some(json!("required")), Some(false)));
        let alts = s["properties"]["tool_call"]["anyOf"].as_array().expect("anyOf");
        assert_eq!(alts.len(), 2);
        assert_eq!(alts[1]["properties"]["arguments"], json!({"type": "object", "properties": {}}));

        let s = schema(&valid(Some(json!("required")), None));
        let calls = &s["properties"]["tool_calls"];
        assert_eq!((calls["type"].as_str(), calls["minItems"].as_u64()), (Some("array"), Some(1)));
        assert_eq!(calls["items"]["anyOf"][0]["properties"]["name"]["const"], "get_weather");

        // llama.cpp's converter follows the text's key order: the tool must be named before its arguments.
        let text = named.grammar_schema().expect("schema");
        assert!(text.find("\"name\"") < text.find("\"arguments\""), "{text}");
    }

    fn parse(text: &str) -> ParsedOutput {
        valid(None, None).parse(text)
    }

    fn names(p: &ParsedOutput) -> Vec<(&str, &str)> {
        p.tool_calls.iter().map(|c| (c.name.as_str(), c.arguments.as_str())).collect()
    }

    #[test]
    fn generic_format() {
        let p = parse(r#" {"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}} "#);
        assert_eq!(names(&p), [("get_weather", r#"{"city":"Paris"}"#)]);
        assert_eq!(p.content, None);
        let p =
            parse(r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time"}]}"#);
        assert_eq!(names(&p), [("get_weather", r#"{"city":"Oslo"}"#), ("get_time", "{}")]);
        assert_eq!(parse(r#"{"response": "hi"}"#), ParsedOutput { content: Some("hi".into()), tool_calls: vec![] });
        assert_eq!(parse(r#"{"response": {"a": 1}}"#).content.as_deref(), Some(r#"{"a":1}"#));
        let raw = r#"{"tool_call": {"name": "rm_rf", "arguments": {}}}"#;
        assert_eq!(parse(raw), ParsedOutput { content: Some(raw.into()), tool_calls: vec![] });
    }

    #[test]
    fn arguments_as_string_and_bad_arguments() {
        let p = parse(r#"{"tool_call": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}"#);
        assert_eq!(names(&p), [("get_weather", r#"{"city":"Rome"}"#)]);
        for bad in [r#""not json""#, "[1]", "42", r#""[1]""#] {
            let raw = format!(r#"{{"tool_call": {{"name": "get_weather", "arguments": {bad}}}}}"#);
            assert_eq!(parse(&raw).content.as_deref(), Some(raw.as_str()), "{raw}");
        }
    }

    #[test]
    fn hermes_blocks() {
        let text = concat!(
            "Checking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n",
            "<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>\nDone."
        );
        let p = parse(text);
        assert_eq!(names(&p), [("get_weather", r#"{"city":"Paris"}"#), ("get_time", "{}")]);
        assert_eq!(p.content.as_deref(), Some("Checking.\n\n\nDone."));
        // An unknown name stays in the content, a known one beside it is still a call.
        let p =
            parse("<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call><tool_call>{\"name\": \"get_time\"}");
        assert_eq!(names(&p), [("get_time", "{}")]);
        assert_eq!(p.content.as_deref(), Some("<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call>"));
        let p = parse("Voilà ✓ <tool_call>{\"name\": \"get_time\"}</tool_call> ünïcode");
        assert_eq!((names(&p), p.content.as_deref()), (vec![("get_time", "{}")], Some("Voilà ✓  ünïcode")));
        let junk = "<tool_call>{not json</tool_call>";
        assert_eq!(parse(junk).content.as_deref(), Some(junk));
    }

    #[test]
    fn llama_bare_json() {
        let p = parse(r#"{"name": "get_weather", "parameters": {"city": "Lima"}}"#);
        assert_eq!(names(&p), [("get_weather", r#"{"city":"Lima"}"#)]);
        let p = parse("Sure.<|python_tag|>{\"type\": \"function\", \"name\": \"get_time\", \"arguments\": {}}");
        assert_eq!((names(&p), p.content.as_deref()), (vec![("get_time", "{}")], Some("Sure.")));
        let p = parse(r#"{"type": "function", "function": {"name": "get_time", "arguments": "{}"}}"#);
        assert_eq!(names(&p), [("get_time", "{}")]);
        let other = r#"{"name": "Ada", "age": 36}"#;
        assert_eq!(parse(other).content.as_deref(), Some(other));
    }

    #[test]
    fn mistral_formats() {
        let p = parse(r#"[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Bern"}}, {"name": "get_time"}]"#);
        assert_eq!(names(&p), [("get_weather", r#"{"city":"Bern"}"#), ("get_time", "{}")]);
        assert_eq!(p.content, None);
        let p = parse(r#"[TOOL_CALLS]get_weather[ARGS]{"city": "Kyiv"}[TOOL_CALLS]get_time[ARGS]{}"#);
        assert_eq!(names(&p), [("get_weather", r#"{"city":"Kyiv"}"#), ("get_time", "{}")]);
        let bad = r#"[TOOL_CALLS][{"name": "get_weather", "arguments": {}}, {"name": "nope", "arguments": {}}]"#;
        assert_eq!(parse(bad).content.as_deref(), Some(bad));
    }

    #[test]
    fn fenced_block() {
        let text = "I'll call it:\n```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Cairo\"}}\n```\nok";
        let p = parse(text);
        assert_eq!(names(&p), [("get_weather", r#"{"city":"Cairo"}"#)]);
        assert_eq!(p.content.as_deref(), Some("I'll call it:\n\nok"));
        let code = "```python\nprint(1)\n```";
        assert_eq!(parse(code).content.as_deref(), Some(code));
    }

    #[test]
    fn plain_text_and_junk_stay_untouched() {
        for text in [
            "",
            "  Hello there.  ",
            "{",
            "[1, 2]",
            "{\"tool_call\": {\"name\": \"get_time\"",
            "[TOOL_CALLS] oops",
            "<|python_tag|>x",
        ] {
            assert_eq!(parse(text), ParsedOutput { content: Some(text.into()), tool_calls: vec![] }, "{text:?}");
        }
    }

    #[test]
    fn no_parallel_keeps_first_call() {
        let p = valid(None, Some(false))
            .parse("<tool_call>{\"name\": \"get_time\"}</tool_call><tool_call>{\"name\": \"get_weather\"}</tool_call>");
        assert_eq!(names(&p), [("get_time", "{}")]);
    }

    #[test]
    fn tool_call_serializes_as_openai() {
        let p = parse(r#"{"tool_call": {"name": "get_time", "arguments": {}}}"#);
        let call = &p.tool_calls[0];
        assert!(call.id.starts_with("call_") && call.id.len() == 29);
        assert!(call.id[5..].bytes().all(|b| b.is_ascii_alphanumeric()));
        let v = serde_json::to_value(call).expect("serialize");
        assert_eq!(v, json!({"id": call.id, "type": "function", "function": {"name": "get_time", "arguments": "{}"}}));
        assert_ne!(parse(r#"{"name": "get_time"}"#).tool_calls[0].id, call.id);
    }
}
