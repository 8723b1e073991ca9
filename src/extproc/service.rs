//! The tonic `ExternalProcessor` service: one spawned task per stream, answers through a bounded
//! channel. Thin by design; the protocol lives in [`Exchange`].

use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::{
    ProcessingRequest, ProcessingResponse, external_processor_server::ExternalProcessor,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use super::{
    error::unreadable_message_status,
    processor::Processor,
    stream::{Exchange, Flow},
};

/// Answers buffered per stream before the task waits for Envoy to read (back-pressure).
const ANSWER_BUFFER: usize = 32;

/// The ext_proc service.
#[derive(Clone)]
pub struct ExtProcService {
    processor: Arc<Processor>,
    tasks: TaskTracker,
}

impl ExtProcService {
    /// A service over `processor`; stream tasks are tracked by `tasks` so shutdown can drain them.
    pub fn new(processor: Arc<Processor>, tasks: TaskTracker) -> Self {
        Self { processor, tasks }
    }
}

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(ANSWER_BUFFER);
        let mut exchange = Exchange::new(self.processor.clone()).watching(tx.clone());
        self.tasks.spawn(async move {
            let mut out = Vec::with_capacity(8);
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(msg)) => msg,
                    Ok(None) => break,
                    Err(status) => {
                        match unreadable_message_status(&status) {
                            Some(answer) => {
                                warn!(code = ?answer.code(), error = %answer.message(), "ext_proc stream ended: unreadable message");
                                let _ = tx.send(Err(answer)).await;
                            }
                            None => debug!(code = ?status.code(), "ext_proc stream ended by the proxy"),
                        }
                        break;
                    }
                };
                let flow = exchange.on_message(msg, &mut out).await;
                for answer in out.drain(..) {
                    if tx.send(Ok(answer)).await.is_err() {
                        return; // the proxy went away; dropping `exchange` releases its counters
                    }
                }
                exchange.after_send();
                if flow == Flow::Close {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
