//! `approx-prefix-cache-producer`: hashes the prompt once per request, looks it up in the
//! approximate [`PrefixIndex`], and records where the request went (pre-request hook).
//!
//! Parameters and defaults are upstream's. Two deliberate differences: `lruCapacityPerServer` is
//! honoured when the engine does not report its block count (upstream computes it and never uses
//! it), and endpoints that leave the pool are purged as soon as a new snapshot shows it (a
//! [`PoolChange`] chore, run off the request path).
//!
//! One parameter of ours, off by default: `forgetOnCacheMiss`. When a model server reports
//! (`usage.prompt_tokens_details.cached_tokens`) fewer cached prompt tokens than the index
//! credited the endpoint with, the engine evidently evicted blocks the index still remembers:
//! the index forgets as many of that endpoint's least recently routed blocks (at least two
//! blocks missed, so the one token an engine always recomputes is no miss). Reports that found
//! more than predicted change nothing.

use std::sync::Arc;

use serde::Deserialize;

use crate::{
    config::{ConfigIssue, PluginSpec},
    datastore::{EndpointId, Snapshot},
    prefix::{BlockingParams, PrefixIndex, block_hashes},
    scheduler::{
        params::decode_params,
        plugin::{
            CacheReport, CycleState, DataProducer, Needs, PluginName, PoolChange, PreRequest,
            SchedulingContext,
        },
    },
};

/// Bytes of prompt per token, the estimate upstream uses to size blocks.
pub const BYTES_PER_TOKEN: usize = 4;

/// Upstream parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ApproxPrefixParams {
    /// Take the block size and capacity from the engine's cache config when it reports them.
    pub auto_tune: bool,
    /// Tokens per block when not auto-tuned.
    pub block_size_tokens: Option<u32>,
    /// Blocks matched at most.
    pub max_prefix_blocks_to_match: u32,
    /// Tokens matched at most (overrides the block limit when > 0).
    pub max_prefix_tokens_to_match: u32,
    /// Index entries per endpoint when the engine does not report its block count.
    pub lru_capacity_per_server: u32,
    /// Deprecated: block size in characters.
    pub block_size: Option<u32>,
    /// Ours: correct the index from the cached tokens model servers report (module doc).
    pub forget_on_cache_miss: bool,
}

impl Default for ApproxPrefixParams {
    fn default() -> Self {
        Self {
            auto_tune: true,
            block_size_tokens: None,
            max_prefix_blocks_to_match: 256,
            max_prefix_tokens_to_match: 0,
            lru_capacity_per_server: 31_250,
            block_size: None,
            forget_on_cache_miss: false,
        }
    }
}

/// Default tokens per block.
pub const DEFAULT_BLOCK_SIZE_TOKENS: u32 = 16;

/// The producer; shares its index with nothing else (the scorer reads the produced match).
pub struct ApproxPrefixProducer {
    name: PluginName,
    params: ApproxPrefixParams,
    block_size_tokens: u32,
    index: Arc<PrefixIndex>,
}

impl ApproxPrefixProducer {
    /// Build from a config entry.
    ///
    /// # Errors
    /// Unknown or contradictory parameters, with their path.
    pub fn from_config(name: PluginName, spec: &PluginSpec) -> Result<Self, ConfigIssue> {
        let params: ApproxPrefixParams = decode_params(spec)?;
        let issue = |field: &str, reason: &str| ConfigIssue {
            path: format!("{}.parameters.{field}", spec.path),
            reason: reason.into(),
        };
        // The character-based size is ambiguous next to token blocks; upstream refuses it alone.
        if params.block_size.is_some_and(|b| b > 0) && params.block_size_tokens.is_none() {
            return Err(issue(
                "blockSize",
                "deprecated blockSize requires blockSizeTokens; set blockSizeTokens instead",
            ));
        }
        let block_size_tokens = params.block_size_tokens.unwrap_or(DEFAULT_BLOCK_SIZE_TOKENS);
        // Without auto-tuning there is no other source of a block size.
        if !params.auto_tune && block_size_tokens == 0 {
            return Err(issue("blockSizeTokens", "must be > 0 when autoTune is false"));
        }
        Ok(Self {
            name,
            params,
            block_size_tokens,
            index: Arc::new(PrefixIndex::new()),
        })
    }

    /// The index (for gauges and tests).
    pub fn index(&self) -> &PrefixIndex {
        &self.index
    }

    fn effective_block_tokens(&self, ctx: &SchedulingContext<'_>) -> u32 {
        let tuned = self
            .params
            .auto_tune
            .then(|| ctx.snapshot.endpoints.first().and_then(|e| e.metrics.block_size))
            .flatten()
            .filter(|b| *b > 0);
        tuned.unwrap_or(if self.block_size_tokens == 0 {
            DEFAULT_BLOCK_SIZE_TOKENS
        } else {
            self.block_size_tokens
        })
    }
}

impl PoolChange for ApproxPrefixProducer {
    fn name(&self) -> &PluginName {
        &self.name
    }

    /// Drop departed endpoints from the index.
    fn on_pool_change(&self, snapshot: &Snapshot) {
        self.index.retain_endpoints(|uid| snapshot.contains_uid(uid));
    }
}

impl DataProducer for ApproxPrefixProducer {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn produces(&self) -> Needs {
        Needs { prefix_match: true }
    }

    fn footprint(&self) -> Option<(usize, usize)> {
        Some((self.index.entries(), self.index.allocated_bytes()))
    }

    fn produce(&self, ctx: &SchedulingContext<'_>, state: &mut CycleState) {
        let block_tokens = self.effective_block_tokens(ctx);
        let max_blocks = if self.params.max_prefix_tokens_to_match > 0 {
            (self.params.max_prefix_tokens_to_match / block_tokens).max(1)
        } else {
            self.params.max_prefix_blocks_to_match
        };
        let params = BlockingParams {
            block_bytes: block_tokens as usize * BYTES_PER_TOKEN,
            max_blocks: max_blocks as usize,
        };
        let mut m = state.prefix.take().unwrap_or_default();
        block_hashes(
            ctx.target_model,
            ctx.request.cache_salt.as_deref(),
            ctx.request.prompt_bytes(ctx.body),
            params,
            &mut m.hashes,
        );
        self.index.match_blocks(&m.hashes, &mut m.matched);
        m.block_size_tokens = block_tokens;
        state.prefix = Some(m);
    }
}

impl PreRequest for ApproxPrefixProducer {
    fn name(&self) -> &PluginName {
        &self.name
    }

    fn pre_request(&self, snapshot: &Snapshot, state: &CycleState, picked: &[EndpointId]) {
        let (Some(m), Some(first)) = (state.prefix.as_ref(), picked.first()) else {
            return;
        };
        let Some(endpoint) = snapshot.get(*first) else {
            return;
        };
        if m.hashes.is_empty() {
            return;
        }
        let capacity = self
            .params
            .auto_tune
            .then_some(endpoint.metrics.num_gpu_blocks)
            .flatten()
            .filter(|n| *n > 0)
            .unwrap_or(u64::from(self.params.lru_capacity_per_server));
        self.index.insert(
            endpoint.uid,
            &m.hashes,
            usize::try_from(capacity).unwrap_or(usize::MAX),
        );
    }

    fn on_cache_report(&self, report: &CacheReport) -> usize {
        if !self.params.forget_on_cache_miss {
            return 0;
        }
        let missed_blocks = report.missed_tokens() / u64::from(report.predicted.block_size_tokens.max(1));
        if missed_blocks < 2 {
            return 0;
        }
        self.index.forget_oldest(
            report.predicted.endpoint,
            usize::try_from(missed_blocks).unwrap_or(usize::MAX),
        )
    }
}
