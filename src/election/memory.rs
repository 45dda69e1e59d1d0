//! The embedded node is always the leader, with epoch 1.

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use super::{Election, Leadership};

pub struct MemoryElection {
    node_id: String,
    state: watch::Sender<Leadership>,
}

impl MemoryElection {
    pub fn new(node_id: String) -> Self {
        Self {
            node_id,
            state: watch::Sender::new(Leadership {
                leader: true,
                epoch: 1,
            }),
        }
    }
}

impl Election for MemoryElection {
    fn watch(&self) -> watch::Receiver<Leadership> {
        self.state.subscribe()
    }

    fn current_leader(&self) -> BoxFuture<'_, Option<String>> {
        let leader = self.state.borrow().leader.then(|| self.node_id.clone());
        Box::pin(async move { leader })
    }

    fn resign(&self) -> BoxFuture<'_, ()> {
        self.state.send_modify(|l| l.leader = false);
        Box::pin(async {})
    }
}
