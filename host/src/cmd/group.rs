//! Where a group lives, in a network of hosts (DESIGN.md §7): a submission addressed to a
//! group is handled by the groups plugin of the group's home host, its sequencer. The home is
//! the host that claimed the group's name in the network's directory, which a `create` request
//! does at the host that takes it; every other host learns it from the directory.

use super::Refusal;
use crate::Host;
use crate::network::NetworkError;
use iim_proto::body::GroupRequest;
use iim_proto::session::Submission;
use iim_proto::{Address, ErrorCode, GROUP_KIND, MessageKind};

/// Makes sure the home of the group `submission` is addressed to is known before it is
/// accepted: a `create` request claims the name for this host (refused while the directory
/// is out of reach: a name must be unique in the network), anything else looks it up if this
/// host does not know it yet. Nothing to do outside a network or for a message to users.
pub async fn find_home(host: &Host, submission: &Submission) -> Result<(), Refusal> {
    let (Some(network), Some(group)) = (&host.network, iim_proto::group_of(&submission.to)) else {
        return Ok(());
    };
    let name = Address::Group(group.clone());
    let creates = matches!(&submission.kind, MessageKind::Custom(kind) if kind == GROUP_KIND)
        && matches!(
            GroupRequest::from_json(&submission.body),
            Ok(GroupRequest::Create { .. })
        );
    if creates {
        return match network.claim(name).await {
            // Free, or this host's already: its plugin says whether the group exists. Taken
            // by another host: the request goes there, whose plugin refuses it.
            Ok(_) => Ok(()),
            Err(NetworkError::Unavailable(reason)) => Err(Refusal::new(
                ErrorCode::UNAVAILABLE,
                format!("cannot create #{group} now: {reason}; try again later"),
            )),
            Err(NetworkError::Store(e)) => Err(e.into()),
        };
    }
    if let Err(e) = network.look_up(std::slice::from_ref(&name)).await {
        // Unknown stays local: this host's plugin answers that there is no such group.
        tracing::warn!(%group, error = %e, "cannot look the group up in the directory");
    }
    Ok(())
}
