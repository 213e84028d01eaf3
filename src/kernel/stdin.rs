//! stdin: a kernel's `input_request` (what `input()`, `getpass()`, `read` ask) and where its answer comes
//! from. Pure logic over [`Message`]s, tested without a kernel; the session's task does the waiting.
//!
//! An execution's prompts are answered in this order: the answers the caller sent with the request
//! (`stdin`, in order), then, for a caller that streams, the caller itself (an `input_request` event and
//! `POST /v1/sessions/{id}/input`). A caller that neither sent enough answers nor streams is refused: the
//! kernel is interrupted (`input()` raises `KeyboardInterrupt`) and the result is an `InputRequired`
//! error that says how to answer. Everything here is bounded: the prompt kept, each answer, the number
//! of answers.

use std::collections::VecDeque;

use serde::Serialize;
use serde_json::Value;

use super::wire::Message;

/// A prompt longer than this (bytes) is cut: it is shown to a client, so it is attacker-sized otherwise.
pub const MAX_PROMPT_BYTES: usize = 4096;
/// The largest answer to one prompt (bytes).
pub const MAX_INPUT_VALUE_BYTES: usize = 64 * 1024;
/// The most answers one request may send up front.
pub const MAX_STDIN_ANSWERS: usize = 1024;

/// What the kernel asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct InputRequest {
    /// The prompt text (at most 4 KiB).
    pub prompt: String,
    /// The kernel asks for a password (`getpass`): a front end would hide what is typed.
    pub password: bool,
}

impl InputRequest {
    /// The `input_request` in `msg`, when it belongs to the execution whose request was `msg_id`.
    pub fn from_message(msg: &Message, msg_id: &str) -> Option<Self> {
        if msg.msg_type() != "input_request" || msg.parent_msg_id() != Some(msg_id) {
            return None;
        }
        let mut prompt = msg.content.get("prompt").and_then(Value::as_str).unwrap_or_default().to_owned();
        if prompt.len() > MAX_PROMPT_BYTES {
            let mut end = MAX_PROMPT_BYTES;
            while !prompt.is_char_boundary(end) {
                end -= 1;
            }
            prompt.truncate(end);
        }
        let password = msg.content.get("password").and_then(Value::as_bool).unwrap_or(false);
        Some(InputRequest { prompt, password })
    }
}

/// Why a set of answers is refused before anything runs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StdinError {
    #[error("`stdin` has {0} answers; at most {MAX_STDIN_ANSWERS} are allowed")]
    TooMany(usize),
    #[error("an input value is {0} bytes; at most {MAX_INPUT_VALUE_BYTES} are allowed")]
    TooLong(usize),
}

/// Checks one answer's size.
pub fn check_value(value: &str) -> Result<(), StdinError> {
    match value.len() {
        n if n > MAX_INPUT_VALUE_BYTES => Err(StdinError::TooLong(n)),
        _ => Ok(()),
    }
}

/// Checks a request's answers: at most [`MAX_STDIN_ANSWERS`], each at most [`MAX_INPUT_VALUE_BYTES`].
pub fn check_answers(given: &[String]) -> Result<(), StdinError> {
    if given.len() > MAX_STDIN_ANSWERS {
        return Err(StdinError::TooMany(given.len()));
    }
    given.iter().try_for_each(|v| check_value(v))
}

/// How to answer the next prompt.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// With this value (the next of the request's answers).
    Given(String),
    /// Ask the streaming caller and wait for its answer.
    Ask,
    /// Nobody can answer: stop the code and say how to answer next time.
    Refuse,
}

/// The answers an execution may give, in order.
#[derive(Debug, Default)]
pub struct Answers {
    given: VecDeque<String>,
    /// The caller streams, so it can be asked.
    interactive: bool,
}

impl Answers {
    /// Checks the bounds: at most [`MAX_STDIN_ANSWERS`], each at most [`MAX_INPUT_VALUE_BYTES`].
    pub fn new(given: Vec<String>, interactive: bool) -> Result<Self, StdinError> {
        check_answers(&given)?;
        Ok(Answers { given: given.into(), interactive })
    }

    /// The caller can no longer be asked (its stream is gone).
    pub fn stop_asking(&mut self) {
        self.interactive = false;
    }

    pub fn next_answer(&mut self) -> Answer {
        match self.given.pop_front() {
            Some(value) => Answer::Given(value),
            None if self.interactive => Answer::Ask,
            None => Answer::Refuse,
        }
    }
}

/// The message of the `InputRequired` error of a refused prompt.
pub fn refusal(prompt: &str) -> String {
    let shown: String = prompt.chars().take(200).collect();
    format!(
        "the code asked for input (prompt: {shown:?}) and no answer was left: send the answers up front in the \
         request's `stdin` list (one per prompt, in order), or stream the execution (`Accept: text/event-stream`) \
         and answer its `input_request` event with POST /v1/sessions/{{id}}/input; the kernel was interrupted"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input_request(parent: &str, content: Value) -> Message {
        let mut m = Message::request("input_request", "k", content);
        m.parent_header = json!({"msg_id": parent});
        m
    }

    #[test]
    fn a_prompt_of_our_execution_is_read_and_others_are_not() {
        let m = input_request("exec-1", json!({"prompt": "name? ", "password": true}));
        assert_eq!(
            InputRequest::from_message(&m, "exec-1"),
            Some(InputRequest { prompt: "name? ".into(), password: true })
        );
        assert_eq!(InputRequest::from_message(&m, "exec-2"), None);
        let other = Message::request("stream", "k", json!({}));
        assert_eq!(InputRequest::from_message(&other, "exec-1"), None);
    }

    #[test]
    fn a_huge_prompt_is_cut_on_a_character_boundary() {
        let m = input_request("e", json!({"prompt": "é".repeat(MAX_PROMPT_BYTES)}));
        let asked = InputRequest::from_message(&m, "e").unwrap();
        assert!(asked.prompt.len() <= MAX_PROMPT_BYTES && asked.prompt.len() >= MAX_PROMPT_BYTES - 1);
        assert!(!asked.password);
    }

    #[test]
    fn given_answers_come_first_then_the_streaming_caller_is_asked() {
        let mut a = Answers::new(vec!["a".into(), "b".into()], true).unwrap();
        assert_eq!(a.next_answer(), Answer::Given("a".into()));
        assert_eq!(a.next_answer(), Answer::Given("b".into()));
        assert_eq!(a.next_answer(), Answer::Ask);
        a.stop_asking();
        assert_eq!(a.next_answer(), Answer::Refuse);
    }

    #[test]
    fn a_caller_that_does_not_stream_is_refused_once_its_answers_run_out() {
        let mut a = Answers::new(vec!["only".into()], false).unwrap();
        assert_eq!(a.next_answer(), Answer::Given("only".into()));
        assert_eq!(a.next_answer(), Answer::Refuse);
        assert!(refusal("x").contains("`stdin`"));
    }

    #[test]
    fn answers_are_bounded_in_number_and_size() {
        assert_eq!(
            Answers::new(vec![String::new(); MAX_STDIN_ANSWERS + 1], false).unwrap_err(),
            StdinError::TooMany(1025)
        );
        let long = "x".repeat(MAX_INPUT_VALUE_BYTES + 1);
        assert_eq!(Answers::new(vec![long], true).unwrap_err(), StdinError::TooLong(MAX_INPUT_VALUE_BYTES + 1));
    }
}
