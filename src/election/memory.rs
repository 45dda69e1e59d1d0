//! The embedded node is always the leader, with epoch 1.

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use super::{Election, Fence, Leadership};

pub struct MemoryElection {
    node_id: String,
    state: watch::Sender<Leadership>,
    fence: Fence,
}

impl MemoryElection {
    pub fn new(node_id: String) -> Self {
        let fence = Fence::default();
        fence.open(1, None);
        Self {
            node_id,
            state: watch::Sender::new(Leadership {
                leader: true,
                epoch: 1,
            }),
            fence,
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
        self.fence.close();
        self.state.send_modify(|l| l.leader = false);
        Box::pin(async {})
    }

    fn fence(&self) -> Fence {
        self.fence.clone()
    }
}
