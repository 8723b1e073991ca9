//! A model of one vLLM V1 engine: continuous batching, chunked prefill, a block KV cache with
//! prefix caching and preemption, LoRA slots, and a step-time model.
//!
//! The engine is a pure state machine with no clock: [`Engine::step`] schedules one batch,
//! applies its effects and returns how long the batch takes; the caller (the discrete-event
//! replay, or the real-time emulator) advances its own time by that much and delivers the
//! step's events at its end. Scheduling follows vLLM V1 (`vllm/v1/core/sched/scheduler.py`):
//! - one token budget (`max_num_batched_tokens`) per step; running requests first (one token for
//!   each decoding request, the next chunk for a partly prefilled one), then waiting requests in
//!   arrival order while budget, `max_num_seqs` and KV blocks allow;
//! - on admission, the longest run of cached full prompt blocks is reused (at least one prompt
//!   token is always recomputed);
//! - a request whose adapter is not already in the step is skipped while `max_loras` distinct
//!   adapters are scheduled; later requests may still go;
//! - when a running request cannot get a block, the most recently admitted request is preempted
//!   (recompute: back to the front of the queue, blocks freed, their hashes still reusable), and
//!   no waiting request is admitted in that step.
//!
//! Generated tokens take KV blocks but are not hashed: their content is unknown to the model, so
//! they are never prefix hits (a follow-up turn's prompt carries its own block identities).

pub mod kv;
pub mod profile;

use std::{collections::VecDeque, sync::Arc};

pub use profile::{EngineProfile, MetricsDialect, StepWork};

use kv::{BlockId, BlockPool};

/// One request as the engine sees it.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    /// Caller's id, echoed in events.
    pub id: u64,
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// Tokens to generate (at least 1).
    pub output_tokens: u32,
    /// Chained hashes of the prompt's full blocks (`prompt_tokens / block_size` of them, or
    /// fewer: missing blocks are never hits).
    pub block_hashes: Arc<[u64]>,
    /// LoRA adapter, `None` for the base model.
    pub adapter: Option<Arc<str>>,
}

/// Why the engine refused a request (HTTP 400 in vLLM).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Prompt plus output exceed `max_model_len`.
    #[error(
        "This model's maximum context length is {max} tokens. However, you requested {requested} tokens."
    )]
    TooLong {
        /// The limit.
        max: u32,
        /// Prompt + output.
        requested: u64,
    },
    /// The request could never fit in the KV cache.
    #[error("request needs {needed} KV blocks but the cache holds {capacity}")]
    ExceedsCache {
        /// Blocks the whole request needs.
        needed: u64,
        /// Blocks in the pool.
        capacity: u32,
    },
}

/// What happened to a request during a step (effective at the step's end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineEvent {
    /// The first output token; `cached_tokens` of the prompt were prefix hits at admission.
    FirstToken {
        /// Request id.
        id: u64,
        /// Prompt tokens served from the prefix cache.
        cached_tokens: u32,
    },
    /// A later output token (only with [`Engine::set_token_events`]).
    Token {
        /// Request id.
        id: u64,
    },
    /// The last output token; the request left the engine.
    Finished {
        /// Request id.
        id: u64,
        /// Tokens generated.
        output_tokens: u32,
    },
}

/// Gauges and counters as a `/metrics` scrape would show them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineGauges {
    /// `num_requests_waiting`.
    pub waiting: u32,
    /// `num_requests_running`.
    pub running: u32,
    /// `kv_cache_usage_perc` (fraction).
    pub kv_usage: f64,
    /// Adapters of running requests, sorted.
    pub running_adapters: Vec<Arc<str>>,
    /// Adapters of waiting requests, sorted.
    pub waiting_adapters: Vec<Arc<str>>,
    /// Prompt tokens looked up in the prefix cache (`prefix_cache_queries`).
    pub prefix_queries: u64,
    /// Of those, tokens found (`prefix_cache_hits`).
    pub prefix_hits: u64,
    /// Preemptions so far (`num_preemptions`).
    pub preemptions: u64,
    /// Prompt tokens computed (`prompt_tokens`).
    pub prompt_tokens: u64,
    /// Tokens generated (`generation_tokens`).
    pub generation_tokens: u64,
    /// Adapter loads onto the GPU.
    pub lora_loads: u64,
}

#[derive(Debug)]
struct Seq {
    req: EngineRequest,
    computed: u32,
    generated: u32,
    blocks: Vec<BlockId>,
    registered: u32,
    /// Prefix hits at the first admission (reported with the first token).
    first_hits: Option<u32>,
}

impl Seq {
    fn total(&self) -> u32 {
        self.req.prompt_tokens + self.generated
    }
}

/// One engine.
#[derive(Debug)]
pub struct Engine {
    profile: EngineProfile,
    pool: BlockPool,
    seqs: Vec<Option<Seq>>,
    free_slots: Vec<usize>,
    waiting: VecDeque<usize>,
    running: Vec<usize>,
    resident_adapters: Vec<(Arc<str>, u64)>,
    steps: u64,
    token_events: bool,
    counters: EngineGauges,
}

impl Engine {
    /// An idle engine with an empty cache.
    pub fn new(profile: EngineProfile) -> Self {
        Self {
            pool: BlockPool::new(profile.num_gpu_blocks),
            profile,
            seqs: Vec::new(),
            free_slots: Vec::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            resident_adapters: Vec::new(),
            steps: 0,
            token_events: false,
            counters: EngineGauges::default(),
        }
    }

    /// The profile.
    pub fn profile(&self) -> &EngineProfile {
        &self.profile
    }

    /// Emit [`EngineEvent::Token`] for every token after the first (streaming needs them; the
    /// replay does not).
    pub fn set_token_events(&mut self, on: bool) {
        self.token_events = on;
    }

    /// Whether nothing is waiting or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Queue a request.
    ///
    /// # Errors
    /// [`Refusal`] when it can never be served.
    pub fn submit(&mut self, req: EngineRequest) -> Result<(), Refusal> {
        let output = req.output_tokens.max(1);
        let prompt = req.prompt_tokens.max(1);
        self.profile.admissible(prompt, output)?;
        let seq = Seq {
            req: EngineRequest {
                prompt_tokens: prompt,
                output_tokens: output,
                ..req
            },
            computed: 0,
            generated: 0,
            blocks: Vec::new(),
            registered: 0,
            first_hits: None,
        };
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.seqs[s] = Some(seq);
                s
            }
            None => {
                self.seqs.push(Some(seq));
                self.seqs.len() - 1
            }
        };
        self.waiting.push_back(slot);
        Ok(())
    }

    /// Drop request `id` wherever it is (the client went away) and free its blocks. Returns
    /// whether it was found.
    pub fn abort(&mut self, id: u64) -> bool {
        let found = self
            .seqs
            .iter()
            .position(|s| s.as_ref().is_some_and(|q| q.req.id == id));
        let Some(slot) = found else { return false };
        self.waiting.retain(|s| *s != slot);
        self.finish(slot);
        true
    }

    /// Gauges as of now.
    pub fn gauges(&self) -> EngineGauges {
        let adapters = |slots: &mut dyn Iterator<Item = &usize>| {
            let mut v: Vec<Arc<str>> = slots
                .filter_map(|s| self.seqs[*s].as_ref())
                .filter_map(|q| q.req.adapter.clone())
                .collect();
            v.sort();
            v.dedup();
            v
        };
        EngineGauges {
            waiting: self.waiting.len() as u32,
            running: self.running.len() as u32,
            kv_usage: self.pool.usage(),
            running_adapters: adapters(&mut self.running.iter()),
            waiting_adapters: adapters(&mut self.waiting.iter()),
            ..self.counters.clone()
        }
    }

    /// Prompt tokens of `req` that a submission now would find cached (whole blocks, leaving at
    /// least one token to compute, as admission does).
    pub fn cached_tokens(&self, req: &EngineRequest) -> u32 {
        if !self.profile.enable_prefix_caching {
            return 0;
        }
        let bs = self.profile.block_size;
        let max = (req.prompt_tokens.max(1) - 1) / bs;
        let hashes = &req.block_hashes[..req.block_hashes.len().min(max as usize)];
        self.pool.cached_prefix(hashes) as u32 * bs
    }

    /// The time to first token `req` would see if submitted now and nothing else arrived, ns:
    /// the engine model's own estimate from its true state, for the simulator's exact-cache
    /// oracle.
    ///
    /// Every running and waiting request's remaining prefill goes first (FCFS), then this one's
    /// uncached tokens, in steps of the token budget left by the decoding requests, each step
    /// priced by [`EngineProfile::step_ns`]. An adapter that cannot join the batch while other
    /// adapters fill the slots waits for their longest remaining decode, and pays a load when it
    /// is not resident. Not modelled: the rest of the step in progress, KV-cache exhaustion, the
    /// `max_num_seqs` cap and preemptions (none binds in an engine that is not overloaded).
    pub fn predict_ttft_ns(&self, req: &EngineRequest) -> u64 {
        let prompt = req.prompt_tokens.max(1);
        let own = u64::from(prompt - self.cached_tokens(req).min(prompt - 1));
        let mut prefill = own;
        let mut decoding = 0u32;
        let mut context = 0u64;
        let mut longest_other_decode = 0u32;
        let mut other_adapters: Vec<&Arc<str>> = Vec::new();
        for (running, &slot) in self
            .running
            .iter()
            .map(|s| (true, s))
            .chain(self.waiting.iter().map(|s| (false, s)))
        {
            let Some(seq) = self.seq(slot) else { continue };
            let prompt_left = if running {
                seq.req.prompt_tokens.saturating_sub(seq.computed)
            } else {
                // Waiting (never started, or preempted and starting over): its own hits.
                seq.req.prompt_tokens - self.cached_tokens(&seq.req).min(seq.req.prompt_tokens - 1)
            };
            if prompt_left == 0 {
                decoding += 1;
                context += u64::from(seq.computed);
            } else {
                prefill += u64::from(prompt_left);
            }
            if let Some(a) = &seq.req.adapter
                && req.adapter.as_ref() != Some(a)
            {
                if !other_adapters.contains(&a) {
                    other_adapters.push(a);
                }
                let left = seq.req.output_tokens.saturating_sub(seq.generated);
                longest_other_decode = longest_other_decode.max(left);
            }
        }
        let budget = u64::from(
            self.profile
                .max_num_batched_tokens
                .saturating_sub(decoding)
                .max(1),
        );
        let step = |prefill_tokens: u64| {
            self.profile.step_ns(&StepWork {
                sequences: decoding + 1,
                decode_context_tokens: context,
                prefill_tokens,
                prefill_attention_pairs: 0.0,
                distinct_adapters: u32::from(req.adapter.is_some()),
            })
        };
        let full_steps = prefill / budget;
        let rest = prefill % budget;
        let mut ns = full_steps * step(budget) + if rest > 0 { step(rest) } else { 0 };
        // The new request's own attention against its cached prefix and earlier chunks.
        let cached = f64::from(prompt) - own as f64;
        ns += (self.profile.attention_per_pair_ns * own as f64 * (cached + own as f64 / 2.0)) as u64;
        if let Some(a) = &req.adapter {
            if other_adapters.len() as u32 >= self.profile.max_loras {
                ns += u64::from(longest_other_decode) * step(0);
            }
            if !self.resident_adapters.iter().any(|(r, _)| r == a) {
                ns += self.profile.lora_load_ns();
            }
        }
        ns
    }

    /// Schedule and run one step. Returns its duration in ns (`None` when idle); `events`
    /// receives what happens at the step's end.
    pub fn step(&mut self, events: &mut Vec<EngineEvent>) -> Option<u64> {
        if self.is_idle() {
            return None;
        }
        self.steps += 1;
        let mut budget = self.profile.max_num_batched_tokens;
        let mut scheduled: Vec<(usize, u32)> = Vec::new();
        let mut step_adapters: Vec<Arc<str>> = Vec::new();
        let mut preempted = false;

        // Running requests first, in admission order.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let slot = self.running[i];
            let n = self.chunk(slot, budget);
            loop {
                if self.grow(slot, n) {
                    break;
                }
                // Out of blocks: preempt the most recently admitted request.
                let Some(victim) = self.running.pop() else { break };
                self.preempt(victim);
                preempted = true;
                if victim == slot {
                    break;
                }
            }
            if self.running.get(i) != Some(&slot) {
                break; // the current request was itself preempted
            }
            budget -= n;
            scheduled.push((slot, n));
            if let Some(a) = self.seq(slot).and_then(|q| q.req.adapter.clone())
                && !step_adapters.contains(&a)
            {
                step_adapters.push(a);
            }
            i += 1;
        }

        // Then waiting requests, unless this step had to preempt.
        if !preempted {
            let mut w = 0;
            while w < self.waiting.len()
                && budget > 0
                && (self.running.len() as u32) < self.profile.max_num_seqs
            {
                let slot = self.waiting[w];
                let adapter = self.seq(slot).and_then(|q| q.req.adapter.clone());
                if let Some(a) = &adapter
                    && !step_adapters.contains(a)
                    && step_adapters.len() as u32 >= self.profile.max_loras
                {
                    w += 1;
                    continue;
                }
                let Some(n) = self.admit(slot, budget) else { break };
                self.waiting.remove(w);
                self.running.push(slot);
                budget -= n;
                scheduled.push((slot, n));
                if let Some(a) = adapter
                    && !step_adapters.contains(&a)
                {
                    step_adapters.push(a);
                }
            }
        }

        let mut work = StepWork {
            sequences: scheduled.len() as u32,
            distinct_adapters: step_adapters.len() as u32,
            ..Default::default()
        };
        let load_ns = self.load_adapters(&step_adapters);
        for &(slot, n) in &scheduled {
            let Some(seq) = self.seqs[slot].as_mut() else {
                continue;
            };
            if n == 1 && seq.computed >= seq.req.prompt_tokens {
                work.decode_context_tokens += u64::from(seq.computed);
            } else {
                work.prefill_tokens += u64::from(n);
                work.prefill_attention_pairs += f64::from(n) * (f64::from(seq.computed) + f64::from(n) / 2.0);
                self.counters.prompt_tokens += u64::from(n);
            }
            seq.computed += n;
            let full = seq.computed.min(seq.req.prompt_tokens) / self.profile.block_size;
            let full = full.min(seq.req.block_hashes.len() as u32);
            while seq.registered < full && self.profile.enable_prefix_caching {
                let k = seq.registered as usize;
                if let (Some(&b), Some(&h)) = (seq.blocks.get(k), seq.req.block_hashes.get(k)) {
                    self.pool.register(b, h);
                }
                seq.registered += 1;
            }
            if seq.computed < seq.total() {
                continue; // prefill continues next step
            }
            seq.generated += 1;
            self.counters.generation_tokens += 1;
            let id = seq.req.id;
            if seq.generated == 1 {
                events.push(EngineEvent::FirstToken {
                    id,
                    cached_tokens: seq.first_hits.unwrap_or(0),
                });
            } else if self.token_events && seq.generated < seq.req.output_tokens {
                events.push(EngineEvent::Token { id });
            }
            if seq.generated >= seq.req.output_tokens {
                events.push(EngineEvent::Finished {
                    id,
                    output_tokens: seq.generated,
                });
                self.finish(slot);
            }
        }
        Some(self.profile.step_ns(&work) + load_ns)
    }

    fn seq(&self, slot: usize) -> Option<&Seq> {
        self.seqs.get(slot).and_then(Option::as_ref)
    }

    /// Tokens to compute for `slot` this step: the rest of its prefill or one decode token.
    fn chunk(&self, slot: usize, budget: u32) -> u32 {
        let Some(seq) = self.seq(slot) else { return 0 };
        let mut n = seq.total().saturating_sub(seq.computed).min(budget);
        if self.profile.long_prefill_token_threshold > 0 {
            n = n.min(self.profile.long_prefill_token_threshold);
        }
        n
    }

    /// Blocks so that `slot` can hold `n` more tokens; `false` if the pool is short.
    fn grow(&mut self, slot: usize, n: u32) -> bool {
        let bs = self.profile.block_size;
        let Some(seq) = self.seqs[slot].as_mut() else {
            return false;
        };
        let need = (seq.computed + n)
            .div_ceil(bs)
            .saturating_sub(seq.blocks.len() as u32);
        need == 0 || self.pool.allocate(need, &mut seq.blocks)
    }

    /// Try to admit waiting `slot` with the given budget: prefix lookup, then blocks for the
    /// first chunk. Returns the chunk, or `None` when the blocks are not there.
    fn admit(&mut self, slot: usize, budget: u32) -> Option<u32> {
        let bs = self.profile.block_size;
        let caching = self.profile.enable_prefix_caching;
        let threshold = self.profile.long_prefill_token_threshold;
        let seq = self.seqs[slot].as_mut()?;
        let total = seq.total();
        let hit_blocks = if caching {
            let max = ((total - 1) / bs) as usize;
            let hashes = &seq.req.block_hashes[..seq.req.block_hashes.len().min(max)];
            self.pool.cached_prefix(hashes)
        } else {
            0
        };
        let hit_tokens = hit_blocks as u32 * bs;
        let mut n = (total - hit_tokens).min(budget);
        if threshold > 0 {
            n = n.min(threshold);
        }
        let need = (hit_tokens + n).div_ceil(bs) - hit_blocks as u32;
        let taken_free = self.pool.free_among_cached(&seq.req.block_hashes, hit_blocks);
        if need + taken_free > self.pool.free_blocks() {
            return None;
        }
        self.pool
            .take_cached(&seq.req.block_hashes, hit_blocks, &mut seq.blocks);
        if !self.pool.allocate(need, &mut seq.blocks) {
            return None; // unreachable: checked above
        }
        seq.computed = hit_tokens;
        seq.registered = hit_blocks as u32;
        if seq.first_hits.is_none() {
            seq.first_hits = Some(hit_tokens);
        }
        self.counters.prefix_queries += u64::from(total);
        self.counters.prefix_hits += u64::from(hit_tokens);
        Some(n)
    }

    fn preempt(&mut self, slot: usize) {
        if let Some(seq) = self.seqs[slot].as_mut() {
            self.pool.release(&seq.blocks);
            seq.blocks.clear();
            seq.computed = 0;
            seq.registered = 0;
        }
        self.counters.preemptions += 1;
        self.waiting.push_front(slot);
    }

    fn finish(&mut self, slot: usize) {
        if let Some(seq) = self.seqs[slot].take() {
            self.pool.release(&seq.blocks);
        }
        self.running.retain(|s| *s != slot);
        self.free_slots.push(slot);
    }

    /// Make the step's adapters resident, evicting the least recently used others. Returns the
    /// load time in ns.
    fn load_adapters(&mut self, needed: &[Arc<str>]) -> u64 {
        let mut ns = 0;
        for a in needed {
            if let Some(r) = self.resident_adapters.iter_mut().find(|(r, _)| r == a) {
                r.1 = self.steps;
                continue;
            }
            if self.resident_adapters.len() as u32 >= self.profile.max_loras
                && let Some(victim) = self
                    .resident_adapters
                    .iter()
                    .enumerate()
                    .filter(|(_, (r, _))| !needed.contains(r))
                    .min_by_key(|(_, (_, used))| *used)
                    .map(|(i, _)| i)
            {
                self.resident_adapters.swap_remove(victim);
            }
            self.resident_adapters.push((a.clone(), self.steps));
            self.counters.lora_loads += 1;
            ns += self.profile.lora_load_ns();
        }
        ns
    }
}

#[cfg(test)]
mod tests;
