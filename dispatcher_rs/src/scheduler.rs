//! The tool-dispatch scheduler for the calls of one step: a synchronous state
//! machine with no I/O and no Python in it.
//!
//! # Rules
//!
//! A queued call may start iff
//! - no non-concurrency-safe ("unsafe") call is running,
//! - it is safe, or nothing at all is running,
//! - `max_concurrent` is 0 (unlimited) or fewer calls than that are running,
//! - its tool has no limit (0) or fewer calls of that tool than the limit are
//!   running.
//!
//! After every submit and complete the scheduler makes one pass over the queue
//! in FIFO order and starts every call that may start, except that
//! - a call that cannot start and is unsafe ends the pass: an unsafe call is
//!   a barrier nothing behind it overtakes, so it cannot starve;
//! - a call that cannot start because of the global cap, or because an unsafe
//!   call is running, ends the pass;
//! - a call blocked only by its own tool's limit is skipped: calls of other
//!   tools behind it may start (calls of its tool stay blocked, so they keep
//!   their order).
//!
//! Dedup: a call whose tool is not dedup-exempt and whose (tool name,
//! canonical input) equals an earlier call's in this step, whatever that
//! call's state, is not queued: it is a duplicate of that earlier call.
//!
//! # Implementation
//!
//! The literal pass walks past every call skipped for its tool limit, which
//! is quadratic when many calls of a limited tool wait. Here each tool keeps
//! its own FIFO of queued safe calls, a min-heap holds the head of every tool
//! that may run more calls, and queued unsafe calls wait in their own FIFO.
//! Popping heads in queue order until the cap is reached or the first queued
//! unsafe call is passed starts exactly the calls the literal pass starts, in
//! the same order (the Python reference implements the literal pass; a
//! property test holds the two together). An unsafe call starts only when it
//! is at the head of the queue and nothing runs.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::hash::BuildHasher;
use std::ops::Range;

use hashbrown::{DefaultHashBuilder, HashMap, HashSet, HashTable};

use crate::canonical::canonicalize;
use crate::error::{Error, NotRunningState};

/// A call's position in submission order; also its index in the scheduler.
pub type CallIndex = u32;

type ToolIndex = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Queued,
    Running { start_no: u32 },
    Completed,
    Duplicate { of: CallIndex },
    Aborted,
}

#[derive(Debug)]
struct Call {
    /// Range of `Scheduler::ids`.
    id: Range<usize>,
    /// Range of `Scheduler::keys`; empty for duplicates and dedup-exempt tools.
    key: Range<usize>,
    tool: ToolIndex,
    safe: bool,
    state: State,
}

#[derive(Debug)]
struct Tool {
    /// Most calls of this tool running at once; `usize::MAX` when unlimited.
    limit: usize,
    running: usize,
    dedup_exempt: bool,
    /// Queued concurrency-safe calls, in queue order.
    queue: VecDeque<CallIndex>,
}

impl Tool {
    fn new() -> Self {
        Self {
            limit: usize::MAX,
            running: 0,
            dedup_exempt: false,
            queue: VecDeque::new(),
        }
    }

    fn has_room(&self) -> bool {
        self.running < self.limit
    }
}

/// One call of a [`Scheduler::submit_many`] batch.
#[derive(Debug, Clone, Copy)]
pub struct CallSpec<'a> {
    pub id: &'a str,
    pub tool_name: &'a str,
    pub input_json: &'a [u8],
    pub concurrency_safe: bool,
}

/// What one submit decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    /// End of this submit's started calls in the caller's `started` buffer.
    pub started_end: usize,
    /// The earlier call this one duplicates, if any.
    pub duplicate_of: Option<CallIndex>,
}

/// The scheduler of one step's tool calls. See the module docs for the rules.
#[derive(Debug)]
pub struct Scheduler {
    /// Most calls running at once; `usize::MAX` when unlimited.
    max_concurrent: usize,
    tools: Vec<Tool>,
    tool_index: HashMap<Box<str>, ToolIndex>,
    calls: Vec<Call>,
    /// Every call's id, back to back (one allocation for the whole step).
    ids: String,
    by_id: HashTable<CallIndex>,
    /// Canonical inputs of the calls that can be duplicated, back to back.
    keys: Vec<u8>,
    by_key: HashTable<CallIndex>,
    hasher: DefaultHashBuilder,
    /// Heads of the tools with queued safe calls and room to run one, as
    /// (call, tool). Entries can go stale (the tool filled up, or its head
    /// started); they are checked when popped.
    ready: BinaryHeap<Reverse<(CallIndex, ToolIndex)>>,
    /// Queued unsafe calls, in queue order.
    barriers: VecDeque<CallIndex>,
    running: usize,
    unsafe_running: bool,
    starts: u32,
    closed: bool,
}

fn limit_from(value: i64, what: impl FnOnce() -> String) -> Result<usize, Error> {
    match usize::try_from(value) {
        Ok(0) => Ok(usize::MAX),
        Ok(limit) => Ok(limit),
        Err(_) => Err(Error::InvalidArgument {
            message: format!("{} must be >= 0 (0 means unlimited), got {value}", what()),
        }),
    }
}

impl Scheduler {
    /// A scheduler with a global cap (`0` = unlimited), per-tool caps
    /// (`0` = unlimited) and the tools whose calls are never deduplicated.
    pub fn new<'a>(
        max_concurrent: i64,
        tool_limits: impl IntoIterator<Item = (&'a str, i64)>,
        dedup_exempt: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, Error> {
        let mut scheduler = Self {
            max_concurrent: limit_from(max_concurrent, || "max_concurrent".to_owned())?,
            tools: Vec::new(),
            tool_index: HashMap::new(),
            calls: Vec::new(),
            ids: String::new(),
            by_id: HashTable::new(),
            keys: Vec::new(),
            by_key: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            ready: BinaryHeap::new(),
            barriers: VecDeque::new(),
            running: 0,
            unsafe_running: false,
            starts: 0,
            closed: false,
        };
        for (name, limit) in tool_limits {
            let limit = limit_from(limit, || format!("the limit of tool '{name}'"))?;
            let tool = scheduler.tool(name);
            scheduler.tools[tool as usize].limit = limit;
        }
        for name in dedup_exempt {
            let tool = scheduler.tool(name);
            scheduler.tools[tool as usize].dedup_exempt = true;
        }
        Ok(scheduler)
    }

    /// Register a call; the calls that may start now go to `started`, in
    /// start order. Returns the earlier call this one duplicates, if any (then
    /// it is neither queued nor run). On error nothing changed.
    pub fn submit(
        &mut self,
        id: &str,
        tool_name: &str,
        input_json: &[u8],
        concurrency_safe: bool,
        started: &mut Vec<CallIndex>,
    ) -> Result<Option<CallIndex>, Error> {
        let id_hash = self.check_new_call(id)?;
        let key_start = self.keys.len();
        if let Err(err) = canonicalize(input_json, &mut self.keys) {
            self.keys.truncate(key_start);
            return Err(Error::invalid_json(id, tool_name, &err));
        }
        let spec = CallSpec {
            id,
            tool_name,
            input_json,
            concurrency_safe,
        };
        Ok(self.register(spec, id_hash, key_start..self.keys.len(), started))
    }

    /// Submit a batch, all or nothing: if any call would be refused, nothing
    /// is registered and the first refusal (in batch order) is returned.
    /// Otherwise each call's result is pushed to `results` as if submitted
    /// one by one, its started calls being `started[previous end..started_end]`.
    pub fn submit_many(
        &mut self,
        calls: &[CallSpec<'_>],
        started: &mut Vec<CallIndex>,
        results: &mut Vec<Submitted>,
    ) -> Result<(), Error> {
        let keys_start = self.keys.len();
        let mut prepared = Vec::with_capacity(calls.len());
        let mut batch_ids: HashSet<&str> = HashSet::with_capacity(calls.len());
        for (n, call) in calls.iter().enumerate() {
            let checked = self.check_new_call_at(call.id, n).and_then(|id_hash| {
                if batch_ids.insert(call.id) {
                    Ok(id_hash)
                } else {
                    Err(Error::AlreadySubmitted {
                        id: call.id.to_owned(),
                    })
                }
            });
            let key_start = self.keys.len();
            let outcome = checked.and_then(|id_hash| {
                canonicalize(call.input_json, &mut self.keys)
                    .map(|()| (id_hash, key_start..self.keys.len()))
                    .map_err(|err| Error::invalid_json(call.id, call.tool_name, &err))
            });
            match outcome {
                Ok(ready) => prepared.push(ready),
                Err(err) => {
                    self.keys.truncate(keys_start);
                    return Err(err);
                }
            }
        }
        self.reserve(calls.len());
        for (call, (id_hash, key)) in calls.iter().zip(prepared) {
            let duplicate_of = self.register(*call, id_hash, key, started);
            results.push(Submitted {
                started_end: started.len(),
                duplicate_of,
            });
        }
        Ok(())
    }

    /// A running call finished; the calls that may start next go to `started`.
    pub fn complete(&mut self, id: &str, started: &mut Vec<CallIndex>) -> Result<(), Error> {
        let index = self
            .find(id)
            .ok_or_else(|| Error::UnknownCall { id: id.to_owned() })?;
        let call = &mut self.calls[index as usize];
        let not_running = |state| {
            Err(Error::NotRunning {
                id: id.to_owned(),
                state,
            })
        };
        match call.state {
            State::Running { .. } => {}
            State::Queued => return not_running(NotRunningState::Queued),
            State::Completed => return not_running(NotRunningState::Completed),
            State::Aborted => return not_running(NotRunningState::Aborted),
            State::Duplicate { of } => {
                let original = self.id(of).to_owned();
                return not_running(NotRunningState::DuplicateOf(original));
            }
        }
        call.state = State::Completed;
        let (tool_index, safe) = (call.tool, call.safe);
        self.running -= 1;
        if !safe {
            self.unsafe_running = false;
        }
        let tool = &mut self.tools[tool_index as usize];
        let was_full = !tool.has_room();
        tool.running -= 1;
        if was_full {
            if let Some(&head) = tool.queue.front() {
                self.ready.push(Reverse((head, tool_index)));
            }
        }
        self.pump(started);
        Ok(())
    }

    /// Close the scheduler: every queued call is dropped and returned in
    /// queue order, and later submits are refused. Running calls may still
    /// complete (and start nothing). Aborting again returns nothing.
    pub fn abort(&mut self) -> Vec<CallIndex> {
        self.closed = true;
        let aborted = self.queued();
        for &index in &aborted {
            self.calls[index as usize].state = State::Aborted;
        }
        for tool in &mut self.tools {
            tool.queue.clear();
        }
        self.ready.clear();
        self.barriers.clear();
        aborted
    }

    /// The queued calls, in queue order.
    pub fn queued(&self) -> Vec<CallIndex> {
        (0..self.calls.len() as CallIndex)
            .filter(|&i| self.calls[i as usize].state == State::Queued)
            .collect()
    }

    /// The running calls, in start order.
    pub fn running(&self) -> Vec<CallIndex> {
        let mut running: Vec<(u32, CallIndex)> = (0..self.calls.len() as CallIndex)
            .filter_map(|i| match self.calls[i as usize].state {
                State::Running { start_no } => Some((start_no, i)),
                _ => None,
            })
            .collect();
        running.sort_unstable();
        running.into_iter().map(|(_, i)| i).collect()
    }

    /// Whether `abort()` was called.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The id of a call this scheduler returned.
    pub fn id(&self, index: CallIndex) -> &str {
        self.calls
            .get(index as usize)
            .and_then(|call| self.ids.get(call.id.clone()))
            .unwrap_or_default()
    }

    fn find(&self, id: &str) -> Option<CallIndex> {
        let hash = self.hasher.hash_one(id);
        let (calls, ids) = (&self.calls, &self.ids);
        self.by_id
            .find(hash, |&i| ids[calls[i as usize].id.clone()] == *id)
            .copied()
    }

    fn check_new_call(&self, id: &str) -> Result<u64, Error> {
        self.check_new_call_at(id, 0)
    }

    /// Refuse a submit after abort, a reused id, or a step too large to index;
    /// `pending` calls of the same batch are not registered yet.
    fn check_new_call_at(&self, id: &str, pending: usize) -> Result<u64, Error> {
        if self.closed {
            return Err(Error::Closed { id: id.to_owned() });
        }
        if self.find(id).is_some() {
            return Err(Error::AlreadySubmitted { id: id.to_owned() });
        }
        if self.calls.len() + pending >= CallIndex::MAX as usize {
            return Err(Error::InvalidArgument {
                message: format!("cannot submit call '{id}': too many calls in one step"),
            });
        }
        Ok(self.hasher.hash_one(id))
    }

    /// Room for `additional` more calls, so a large batch does not rehash as it goes.
    fn reserve(&mut self, additional: usize) {
        let (calls, ids, keys, hasher) = (&self.calls, &self.ids, &self.keys, &self.hasher);
        self.by_id.reserve(additional, |&i| {
            hasher.hash_one(&ids[calls[i as usize].id.clone()])
        });
        self.by_key.reserve(additional, |&i| {
            let call = &calls[i as usize];
            hasher.hash_one((call.tool, &keys[call.key.clone()]))
        });
        self.calls.reserve(additional);
    }

    fn tool(&mut self, name: &str) -> ToolIndex {
        if let Some(&index) = self.tool_index.get(name) {
            return index;
        }
        // Tools are named by the caller's configuration and the model; far
        // fewer than 2^32 in one step (each needs a call or a config entry).
        let index = self.tools.len() as ToolIndex;
        self.tools.push(Tool::new());
        self.tool_index.insert(name.into(), index);
        index
    }

    /// Record a checked call whose canonical input is `keys[key]`, dedup it,
    /// and queue and pump it unless it is a duplicate.
    fn register(
        &mut self,
        spec: CallSpec<'_>,
        id_hash: u64,
        key: Range<usize>,
        started: &mut Vec<CallIndex>,
    ) -> Option<CallIndex> {
        let index = self.calls.len() as CallIndex;
        let tool = self.tool(spec.tool_name);

        let mut state = State::Queued;
        let mut key_span = key.start..key.start;
        if !self.tools[tool as usize].dedup_exempt {
            let key_hash = self.hasher.hash_one((tool, &self.keys[key.clone()]));
            let (calls, keys) = (&self.calls, &self.keys);
            let original = self.by_key.find(key_hash, |&i| {
                let other = &calls[i as usize];
                other.tool == tool && keys[other.key.clone()] == keys[key.clone()]
            });
            match original {
                Some(&of) => state = State::Duplicate { of },
                None => {
                    key_span = key.clone();
                    let hasher = &self.hasher;
                    self.by_key.insert_unique(key_hash, index, |&i| {
                        let other = &calls[i as usize];
                        hasher.hash_one((other.tool, &keys[other.key.clone()]))
                    });
                }
            }
        }
        if key_span.is_empty() && key.end == self.keys.len() {
            // Not kept (single submits; batches keep earlier calls' keys after it).
            self.keys.truncate(key.start);
        }

        let id_start = self.ids.len();
        self.ids.push_str(spec.id);
        self.calls.push(Call {
            id: id_start..self.ids.len(),
            key: key_span,
            tool,
            safe: spec.concurrency_safe,
            state,
        });
        let (calls, ids, hasher) = (&self.calls, &self.ids, &self.hasher);
        self.by_id.insert_unique(id_hash, index, |&i| {
            hasher.hash_one(&ids[calls[i as usize].id.clone()])
        });

        if let State::Duplicate { of } = state {
            return Some(of);
        }
        if spec.concurrency_safe {
            let tool_state = &mut self.tools[tool as usize];
            tool_state.queue.push_back(index);
            if tool_state.queue.len() == 1 && tool_state.has_room() {
                self.ready.push(Reverse((index, tool)));
            }
        } else {
            self.barriers.push_back(index);
        }
        self.pump(started);
        None
    }

    /// The pass over the queue (see the module docs), in O(log n) per start.
    fn pump(&mut self, started: &mut Vec<CallIndex>) {
        if self.unsafe_running {
            return;
        }
        let barrier = self.barriers.front().copied().unwrap_or(CallIndex::MAX);
        while self.running < self.max_concurrent {
            let Some(&Reverse((index, tool_index))) = self.ready.peek() else {
                break;
            };
            if index > barrier {
                break;
            }
            self.ready.pop();
            let tool = &mut self.tools[tool_index as usize];
            if tool.queue.front() != Some(&index) || !tool.has_room() {
                continue; // stale: started already, or the tool filled up
            }
            tool.queue.pop_front();
            tool.running += 1;
            if let Some(&next) = tool.queue.front() {
                if tool.has_room() {
                    self.ready.push(Reverse((next, tool_index)));
                }
            }
            self.start(index, started);
        }
        // With nothing running no tool is full, so every queued safe call
        // ahead of the first unsafe one would have started: it is the head.
        if self.running == 0 {
            if let Some(index) = self.barriers.pop_front() {
                let tool = self.calls[index as usize].tool;
                self.tools[tool as usize].running += 1;
                self.unsafe_running = true;
                self.start(index, started);
            }
        }
    }

    fn start(&mut self, index: CallIndex, started: &mut Vec<CallIndex>) {
        self.calls[index as usize].state = State::Running {
            start_no: self.starts,
        };
        self.starts += 1;
        self.running += 1;
        started.push(index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    struct Harness {
        scheduler: Scheduler,
    }

    impl Harness {
        fn new(max_concurrent: i64, limits: &[(&str, i64)], exempt: &[&str]) -> Self {
            Self {
                scheduler: Scheduler::new(
                    max_concurrent,
                    limits.iter().copied(),
                    exempt.iter().copied(),
                )
                .expect("valid arguments"),
            }
        }

        fn names(&self, calls: &[CallIndex]) -> Vec<String> {
            calls
                .iter()
                .map(|&c| self.scheduler.id(c).to_owned())
                .collect()
        }

        fn try_submit(
            &mut self,
            id: &str,
            tool: &str,
            input: &str,
            safe: bool,
        ) -> Result<(Vec<String>, Option<String>), Error> {
            let mut started = Vec::new();
            let dup = self
                .scheduler
                .submit(id, tool, input.as_bytes(), safe, &mut started)?;
            Ok((
                self.names(&started),
                dup.map(|c| self.scheduler.id(c).to_owned()),
            ))
        }

        fn submit(&mut self, id: &str, tool: &str, safe: bool) -> Vec<String> {
            let input = format!("{{\"id\": \"{id}\"}}");
            let (started, dup) = self.try_submit(id, tool, &input, safe).expect("submit");
            assert_eq!(dup, None);
            started
        }

        fn complete(&mut self, id: &str) -> Vec<String> {
            let mut started = Vec::new();
            self.scheduler.complete(id, &mut started).expect("complete");
            self.names(&started)
        }

        fn queued(&self) -> Vec<String> {
            self.names(&self.scheduler.queued())
        }

        fn running(&self) -> Vec<String> {
            self.names(&self.scheduler.running())
        }
    }

    fn v(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn sequential_with_cap_one() {
        let mut h = Harness::new(1, &[], &[]);
        assert_eq!(h.submit("a", "t", true), v(&["a"]));
        assert_eq!(h.submit("b", "t", true), v(&[]));
        assert_eq!(h.submit("c", "t", true), v(&[]));
        assert_eq!(h.queued(), v(&["b", "c"]));
        assert_eq!(h.complete("a"), v(&["b"]));
        assert_eq!(h.complete("b"), v(&["c"]));
        assert_eq!(h.complete("c"), v(&[]));
    }

    #[test]
    fn unlimited_starts_everything() {
        let mut h = Harness::new(0, &[], &[]);
        for id in ["a", "b", "c", "d"] {
            assert_eq!(h.submit(id, "t", true), v(&[id]));
        }
        assert_eq!(h.running(), v(&["a", "b", "c", "d"]));
    }

    #[test]
    fn tool_limit_skips_but_keeps_order() {
        let mut h = Harness::new(3, &[("shell", 1)], &[]);
        assert_eq!(h.submit("s1", "shell", true), v(&["s1"]));
        assert_eq!(h.submit("s2", "shell", true), v(&[]));
        assert_eq!(h.submit("r1", "read", true), v(&["r1"]));
        assert_eq!(h.submit("s3", "shell", true), v(&[]));
        assert_eq!(h.submit("r2", "read", true), v(&["r2"]));
        assert_eq!(h.submit("r3", "read", true), v(&[]));
        assert_eq!(h.queued(), v(&["s2", "s3", "r3"]));
        // The freed slot goes to the first call that may start: s2 (shell has room).
        assert_eq!(h.complete("s1"), v(&["s2"]));
        assert_eq!(h.complete("r1"), v(&["r3"]));
        assert_eq!(h.complete("s2"), v(&["s3"]));
    }

    #[test]
    fn unsafe_runs_alone_and_is_a_barrier() {
        let mut h = Harness::new(5, &[], &[]);
        assert_eq!(h.submit("a", "read", true), v(&["a"]));
        assert_eq!(h.submit("w", "write", false), v(&[]));
        assert_eq!(h.submit("b", "read", true), v(&[]));
        assert_eq!(h.complete("a"), v(&["w"]));
        assert_eq!(h.running(), v(&["w"]));
        assert_eq!(h.submit("c", "read", true), v(&[]));
        assert_eq!(h.complete("w"), v(&["b", "c"]));
    }

    #[test]
    fn unsafe_call_counts_toward_its_tool_limit() {
        let mut h = Harness::new(0, &[("edit", 1)], &[]);
        assert_eq!(h.submit("e1", "edit", false), v(&["e1"]));
        assert_eq!(h.submit("e2", "edit", true), v(&[]));
        assert_eq!(h.submit("e3", "edit", true), v(&[]));
        assert_eq!(h.complete("e1"), v(&["e2"]));
        assert_eq!(h.complete("e2"), v(&["e3"]));
    }

    #[test]
    fn dedup() {
        let mut h = Harness::new(1, &[], &["shell"]);
        assert_eq!(
            h.try_submit("a", "read", r#"{"path": "x", "n": 1}"#, true),
            Ok((v(&["a"]), None))
        );
        assert_eq!(
            h.try_submit("b", "read", "{\"n\":1.0,\n \"path\":\"\\u0078\"}", true),
            Ok((v(&[]), Some("a".to_owned())))
        );
        assert_eq!(
            h.try_submit("c", "read", r#"{"path": "y", "n": 1}"#, true),
            Ok((v(&[]), None))
        );
        assert_eq!(
            h.try_submit("d", "grep", r#"{"path": "x", "n": 1}"#, true),
            Ok((v(&[]), None))
        );
        assert_eq!(h.try_submit("e", "shell", "{}", true), Ok((v(&[]), None)));
        assert_eq!(h.try_submit("f", "shell", "{}", true), Ok((v(&[]), None)));
        assert_eq!(h.complete("a"), v(&["c"]));
        assert_eq!(
            h.try_submit("g", "read", r#"{"n": 1, "path": "x"}"#, true),
            Ok((v(&[]), Some("a".to_owned())))
        );
        let err = h.scheduler.complete("b", &mut Vec::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "call 'b' is a duplicate of 'a' and never runs: complete 'a'"
        );
    }

    #[test]
    fn abort_returns_queued_and_closes() {
        let mut h = Harness::new(1, &[], &[]);
        h.submit("a", "t", true);
        h.submit("b", "t", true);
        h.submit("c", "t", false);
        let aborted = h.scheduler.abort();
        assert_eq!(h.names(&aborted), v(&["b", "c"]));
        assert!(h.scheduler.is_closed());
        assert_eq!(h.queued(), v(&[]));
        assert_eq!(h.running(), v(&["a"]));
        let err = h.try_submit("d", "t", "{}", true).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidState);
        let err = h.scheduler.complete("b", &mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidState);
        assert_eq!(h.complete("a"), v(&[]));
        assert!(h.scheduler.abort().is_empty());
    }

    #[test]
    fn errors_leave_state_unchanged() {
        let mut h = Harness::new(1, &[], &[]);
        h.submit("a", "t", true);
        let err = h.try_submit("a", "t", "{}", true).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidState);
        let err = h.try_submit("b", "t", "{", true).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(err.to_string().contains("line 1 column 1"), "{err}");
        let mut started = Vec::new();
        let err = h.scheduler.complete("zz", &mut started).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnknownCall);
        h.submit("b", "t", true);
        let err = h.scheduler.complete("b", &mut started).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidState);
        assert_eq!(h.complete("a"), v(&["b"]));
        let err = h.scheduler.complete("a", &mut started).unwrap_err();
        assert_eq!(err.to_string(), "call 'a' already completed");
    }

    #[test]
    fn negative_limits_are_refused() {
        let err = Scheduler::new(-1, [], []).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert_eq!(
            err.to_string(),
            "max_concurrent must be >= 0 (0 means unlimited), got -1"
        );
        let err = Scheduler::new(0, [("shell", -2)], []).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the limit of tool 'shell' must be >= 0 (0 means unlimited), got -2"
        );
    }

    #[test]
    fn submit_many_is_all_or_nothing() {
        let mut s = Scheduler::new(1, [], []).expect("valid");
        let spec = |id, input: &'static str| CallSpec {
            id,
            tool_name: "t",
            input_json: input.as_bytes(),
            concurrency_safe: true,
        };
        let mut started = Vec::new();
        let mut results = Vec::new();
        let err = s
            .submit_many(
                &[spec("a", "{}"), spec("b", "[1]"), spec("c", "nope")],
                &mut started,
                &mut results,
            )
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        let err = s
            .submit_many(
                &[spec("a", "1"), spec("a", "2")],
                &mut started,
                &mut results,
            )
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidState);
        assert!(s.queued().is_empty() && results.is_empty() && started.is_empty());

        s.submit_many(
            &[spec("a", "{}"), spec("b", "{ }"), spec("c", "[1]")],
            &mut started,
            &mut results,
        )
        .expect("valid batch");
        assert_eq!(
            results,
            vec![
                Submitted {
                    started_end: 1,
                    duplicate_of: None
                },
                Submitted {
                    started_end: 1,
                    duplicate_of: Some(0)
                },
                Submitted {
                    started_end: 1,
                    duplicate_of: None
                },
            ]
        );
        assert_eq!(started, vec![0]);
        assert_eq!(s.queued(), vec![2]);
    }

    /// The literal pass from the rules, to check the heap-based one against.
    #[derive(Default)]
    struct Literal {
        max: usize,
        limits: Vec<usize>,
        queue: Vec<(usize, usize, bool)>, // (id, tool, safe)
        running: Vec<(usize, usize, bool)>,
    }

    impl Literal {
        fn pump(&mut self) -> Vec<usize> {
            let mut started = Vec::new();
            let mut i = 0;
            while i < self.queue.len() {
                let (id, tool, safe) = self.queue[i];
                let unsafe_running = self.running.iter().any(|c| !c.2);
                let cap = self.max != 0 && self.running.len() >= self.max;
                let tool_full = self.limits[tool] != 0
                    && self.running.iter().filter(|c| c.1 == tool).count() >= self.limits[tool];
                if unsafe_running || cap || (!safe && !self.running.is_empty()) {
                    break;
                }
                if tool_full {
                    if !safe {
                        break;
                    }
                    i += 1;
                    continue;
                }
                self.queue.remove(i);
                self.running.push((id, tool, safe));
                started.push(id);
            }
            started
        }
    }

    /// A small deterministic generator, so the crate needs no test deps.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, bound: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) % bound as u64) as usize
        }
    }

    #[test]
    fn matches_the_literal_pass() {
        for seed in 0..300u64 {
            let mut rng = Lcg(seed);
            let max = rng.next(4);
            let limits: Vec<usize> = (0..3).map(|_| rng.next(3)).collect();
            let names = ["t0", "t1", "t2"];
            let config: Vec<(&str, i64)> = names
                .iter()
                .zip(&limits)
                .map(|(&n, &l)| (n, l as i64))
                .collect();
            let mut fast = Scheduler::new(max as i64, config, []).expect("valid");
            let mut literal = Literal {
                max,
                limits: limits.clone(),
                ..Literal::default()
            };
            let mut next_id = 0;
            for _ in 0..60 {
                let mut started = Vec::new();
                let expected = if literal.running.is_empty() || rng.next(3) > 0 {
                    let tool = rng.next(3);
                    let safe = rng.next(5) > 0;
                    let id = next_id;
                    next_id += 1;
                    fast.submit(
                        &id.to_string(),
                        names[tool],
                        id.to_string().as_bytes(),
                        safe,
                        &mut started,
                    )
                    .expect("submit");
                    literal.queue.push((id, tool, safe));
                    literal.pump()
                } else {
                    let (id, _, _) = literal.running.remove(rng.next(literal.running.len()));
                    fast.complete(&id.to_string(), &mut started)
                        .expect("complete");
                    literal.pump()
                };
                let got: Vec<usize> = started
                    .iter()
                    .map(|&c| fast.id(c).parse().expect("numeric id"))
                    .collect();
                assert_eq!(got, expected, "seed {seed}");
                let queued: Vec<usize> = fast
                    .queued()
                    .iter()
                    .map(|&c| fast.id(c).parse().expect("numeric id"))
                    .collect();
                let want: Vec<usize> = literal.queue.iter().map(|c| c.0).collect();
                assert_eq!(queued, want, "seed {seed}");
            }
        }
    }
}
