//! A client's session: the protocol state machine between the frames the
//! reader decodes and the outbox the writer drains. It knows who the client is
//! (its [`Principal`]) and what it subscribes to, answers every request, and
//! runs the joins that recover history channels from a client's `since`.
//! No I/O of its own: [`crate::session::connection`] owns the socket.

pub(crate) mod connection;
pub(crate) mod inbound;
pub mod outbox;
pub mod write_batch;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::join_all;

use crate::Node;
use crate::auth::{AuthError, Principal};
use crate::channel::{self, Pattern};
use crate::history::Since;
use crate::hub::{ConnectionId, Join, JoinRead};
use crate::protocol::{
    self, ChannelError, CloseCode, ErrorCode, PresenceUser, ReplyError, ReplyPosition, Request,
    RequestId, ServerFrame,
};
use crate::rate::TokenBucket;
use crate::session::outbox::{ChannelKey, Outbox};

/// How many times a join reads the stream again when another join on the
/// same channel moved the cursor past its first read.
const JOIN_ATTEMPTS: usize = 5;

/// What a session does with the messages its client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Protocol v1: requests in; a welcome, replies and deliveries out.
    Gateway,
    /// Test only (the `test-echo` feature, `GET /echo`): no welcome, and every
    /// message goes back as it came, text as text and binary as binary,
    /// through the same reader, outbox and writer as a gateway session. The
    /// Autobahn testsuite runs against it (`scripts/autobahn.sh`).
    #[cfg(feature = "test-echo")]
    Echo,
}

impl Mode {
    /// Whether messages go back as they came instead of being requests.
    /// Always false, and optimized away, without the `test-echo` feature.
    pub(crate) fn echoes(self) -> bool {
        match self {
            Mode::Gateway => false,
            #[cfg(feature = "test-echo")]
            Mode::Echo => true,
        }
    }
}

/// The reader's state: who the client is and what it subscribes to. Dropping
/// it removes every subscription from the hub.
pub(crate) struct Session {
    node: Node,
    id: ConnectionId,
    principal: Principal,
    /// Zero-sized unless the `test-echo` feature is on.
    mode: Mode,
    pub(crate) outbox: Arc<Outbox>,
    /// The publish rate limits, made on the first publish: messages and
    /// bytes per second.
    publish_limits: Option<Box<(TokenBucket, TokenBucket)>>,
    /// Presence channels this connection is counted on.
    /// Boxed on the first presence subscription: most connections have none,
    /// and an empty set is 48 bytes in every session.
    #[expect(
        clippy::box_collection,
        reason = "the box keeps an empty set out of every idle session"
    )]
    present: Option<Box<HashSet<Arc<str>>>>,
    /// Subscribed channels, sharing the hub's copy of each name.
    channels: HashMap<Arc<str>, ChannelKey>,
}

impl Drop for Session {
    fn drop(&mut self) {
        let present: Vec<Arc<str>> = self
            .present
            .iter()
            .flat_map(|set| set.iter().cloned())
            .collect();
        for channel in present {
            self.presence_left(&channel);
        }
        for channel in self.channels.keys() {
            self.node.hub.unsubscribe(self.id, channel);
        }
    }
}

impl Session {
    pub(crate) fn new(
        node: Node,
        id: ConnectionId,
        principal: Principal,
        mode: Mode,
        outbox: Arc<Outbox>,
    ) -> Session {
        Session {
            node,
            id,
            principal,
            mode,
            outbox,
            publish_limits: None,
            present: None,
            channels: HashMap::new(),
        }
    }

    /// Queues the welcome frame, the first the client gets (none in echo mode).
    pub(crate) fn welcome(&self) {
        if self.mode.echoes() {
            return;
        }
        self.outbox.push_reply(
            ServerFrame::Welcome {
                connection_id: self.id,
                node_id: &self.node.id,
                user: &self.principal.user,
                protocol: protocol::SUBPROTOCOL,
                ping_interval_ms: self.node.config.ping.interval.as_millis() as u64,
                expires_at: self.principal.expires_at,
            }
            .encode(),
        );
    }

    pub(crate) async fn on_text(&mut self, payload: Vec<u8>) {
        if self.mode.echoes() {
            self.outbox.push_reply(Bytes::from(payload));
            return;
        }
        match protocol::parse_request(&payload) {
            Ok(request) => self.handle(request).await,
            Err(error) => self.send_error(error.id, error.code, &error.message),
        }
    }

    pub(crate) fn on_binary(&mut self, payload: Vec<u8>) {
        if self.mode.echoes() {
            self.outbox.push_binary_reply(Bytes::from(payload));
            return;
        }
        self.send_error(
            None,
            ErrorCode::UnsupportedFrame,
            "protocol v1 uses text frames only",
        );
    }

    fn send_error(&self, id: Option<RequestId>, code: ErrorCode, message: &str) {
        self.node.metrics.client_error(code);
        self.outbox
            .push_reply(ServerFrame::Error { id, code, message }.encode());
    }

    /// The requests that wait (on Redis, a join, the JWKS) run boxed: the
    /// reader task's future, which every connection holds for life, then
    /// keeps a pointer for them instead of room for the largest one.
    async fn handle(&mut self, request: Request) {
        match request {
            Request::Subscribe {
                id,
                channels,
                since,
            } => Box::pin(self.subscribe(id, channels, since)).await,
            Request::Unsubscribe { id, channels } => self.unsubscribe(id, channels),
            Request::Ping { id } => self.outbox.push_reply(ServerFrame::Pong { id }.encode()),
            Request::Refresh { id, token } => Box::pin(self.refresh(id, &token)).await,
            Request::Publish { id, channel, data } => {
                Box::pin(self.publish(id, channel, data)).await
            }
            Request::Presence { id, channel } => Box::pin(self.presence(id, &channel, false)).await,
            Request::PresenceCount { id, channel } => {
                Box::pin(self.presence(id, &channel, true)).await
            }
        }
    }

    /// Refuses a request naming more channels than a connection may hold, so
    /// that no request can make a reply larger than a bounded one.
    fn too_many_channels(&self, id: Option<RequestId>, requested: &[String]) -> bool {
        let max_channels = self.node.config.limits.max_channels_per_connection;
        if requested.len() <= max_channels {
            return false;
        }
        self.send_error(
            id,
            ErrorCode::LimitExceeded,
            &format!("at most {max_channels} channels per request"),
        );
        true
    }

    async fn subscribe(
        &mut self,
        id: Option<RequestId>,
        requested: Vec<String>,
        since: Vec<(String, Since)>,
    ) {
        if self.too_many_channels(id, &requested) {
            return;
        }
        let max_channels = self.node.config.limits.max_channels_per_connection;
        if since.len() > max_channels {
            self.send_error(
                id,
                ErrorCode::LimitExceeded,
                &format!("since names at most {max_channels} channels"),
            );
            return;
        }
        let mut since: HashMap<String, Since> = since.into_iter().collect();
        let mut subscribed = Vec::new();
        let mut errors = Vec::new();
        let mut added: Vec<Arc<str>> = Vec::new();
        let mut joins: Vec<(Join, Option<Since>)> = Vec::new();
        let mut held_history: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for name in requested {
            if !seen.insert(name.clone()) {
                continue;
            }
            let refusal = if name.contains('*') {
                self.subscribe_pattern(&name, joins.len(), &mut added)
            } else if let Err(error) = channel::validate_name(&name) {
                Some((ErrorCode::InvalidChannel, error.to_string()))
            } else if !self.principal.may_subscribe(&name) {
                Some((
                    ErrorCode::Forbidden,
                    "the token does not grant this channel".to_owned(),
                ))
            } else if self.channels.contains_key(name.as_str()) {
                // Already live: a repeated subscribe recovers nothing.
                if self.node.hub.history_rule(&name).is_some() {
                    held_history.push(name.clone());
                }
                None
            } else if self.channels.len() + joins.len() >= max_channels {
                Some((
                    ErrorCode::LimitExceeded,
                    format!("at most {max_channels} channels per connection"),
                ))
            } else if self.node.hub.history_rule(&name).is_some() {
                let join = self.node.hub.begin_join(self.id, &name);
                added.push(join.channel.clone());
                joins.push((join, since.remove(&name)));
                None
            } else {
                let sub = self.node.hub.subscribe(self.id, &self.outbox, &name);
                self.channels.insert(sub.channel.clone(), sub.key);
                added.push(sub.channel);
                None
            };
            match refusal {
                Some((code, message)) => errors.push(ChannelError {
                    // An invalid name is echoed only up to the longest valid
                    // one, so a reply is never much larger than a request.
                    channel: truncated(name, channel::MAX_CHANNEL_LEN),
                    code,
                    message,
                }),
                None => subscribed.push(name),
            }
        }
        if !added.is_empty() {
            if let Err(error) = self.node.broker.ensure_subscribed(&added).await {
                // Dropping the joins lets their channels go.
                joins.clear();
                for channel in &added {
                    self.leave(channel);
                    subscribed.retain(|name| name.as_str() != &**channel);
                    errors.push(ChannelError {
                        channel: channel.to_string(),
                        code: ErrorCode::BrokerUnavailable,
                        message: error.to_string(),
                    });
                }
            }
        }
        let mut reads = Vec::with_capacity(joins.len());
        let snapshots = join_all(joins.iter().map(|(join, since)| {
            let (from, count) = join.read_range(since.as_ref());
            self.node.broker.read_history(&join.channel, from, count)
        }))
        .await;
        for ((join, since), snapshot) in joins.into_iter().zip(snapshots) {
            match snapshot {
                Ok(snapshot) => reads.push(JoinRead {
                    join,
                    since,
                    snapshot,
                }),
                Err(error) => {
                    subscribed.retain(|name| name.as_str() != &*join.channel);
                    errors.push(ChannelError {
                        channel: join.channel.to_string(),
                        code: ErrorCode::BrokerUnavailable,
                        message: error.to_string(),
                    });
                }
            }
        }
        for error in &errors {
            self.node.metrics.client_error(error.code);
        }
        let mut positions: BTreeMap<String, ReplyPosition> = held_history
            .into_iter()
            .filter_map(|name| {
                let (epoch, offset) = self.node.hub.position(&name)?;
                Some((
                    name,
                    ReplyPosition {
                        offset,
                        epoch: epoch.to_string(),
                        recovered: None,
                        reason: None,
                    },
                ))
            })
            .collect();
        let mut joined: Vec<(Arc<str>, ChannelKey)> = Vec::new();
        for attempt in 1..=JOIN_ATTEMPTS {
            let stale = self.node.hub.finish_joins(
                &self.outbox,
                &mut reads,
                attempt == JOIN_ATTEMPTS,
                |outcomes| {
                    for outcome in outcomes {
                        joined.push((outcome.channel.clone(), outcome.key));
                        positions.insert(
                            outcome.channel.to_string(),
                            ReplyPosition {
                                offset: outcome.offset,
                                epoch: outcome.epoch.to_string(),
                                recovered: outcome.recovered.map(|r| r.is_ok()),
                                reason: outcome
                                    .recovered
                                    .and_then(|r| r.err())
                                    .map(|reason| reason.as_str()),
                            },
                        );
                    }
                    self.outbox.push_reply(
                        ServerFrame::Reply {
                            id,
                            channels: Some(&subscribed),
                            errors: Some(&errors),
                            positions: (!positions.is_empty()).then_some(&positions),
                            presence: None,
                            users: None,
                            connections: None,
                            revoked: None,
                            expires_at: None,
                            error: None,
                        }
                        .encode(),
                    );
                },
            );
            if stale.is_empty() {
                break;
            }
            // Another join moved a cursor past these reads: read again.
            let again = join_all(stale.iter().map(|&i| {
                let read = &reads[i];
                let (from, count) = read.join.read_range(read.since.as_ref());
                self.node
                    .broker
                    .read_history(&read.join.channel, from, count)
            }))
            .await;
            for (&i, snapshot) in stale.iter().zip(again) {
                // A failed read keeps the stale one; the last attempt
                // finishes it as well as it can.
                if let Ok(snapshot) = snapshot {
                    reads[i].snapshot = snapshot;
                }
            }
        }
        self.channels.extend(joined);
        // Presence counts the connection once it is subscribed.
        for name in &subscribed {
            if self.node.hub.presence_rule(name).is_some()
                && self.channels.contains_key(name.as_str())
            {
                self.presence_joined(name).await;
            }
        }
    }

    /// Counts this connection on a presence channel it just subscribed to;
    /// the user's first connection on the node tells the broker.
    async fn presence_joined(&mut self, channel: &str) {
        if !self.present.get_or_insert_default().insert(channel.into()) {
            return;
        }
        if let Some(members) = self.node.hub.presence_add(channel, &self.principal.user) {
            let event = crate::presence::Event::Join(&self.principal.user);
            // A failure is repaired by the next heartbeat.
            let _ = self
                .node
                .broker
                .presence_sync(channel, &members, Some(event))
                .await;
        }
    }

    /// Uncounts this connection from a presence channel it leaves; the
    /// user's last connection on the node tells the broker, in a task (a
    /// session may be dropped, and cannot wait).
    fn presence_left(&mut self, channel: &str) {
        if !self.present.as_mut().is_some_and(|set| set.remove(channel)) {
            return;
        }
        let user = self.principal.user.clone();
        if let Some(members) = self.node.hub.presence_remove(channel, &user) {
            let node = self.node.clone();
            let channel = channel.to_owned();
            tokio::spawn(async move {
                let event = crate::presence::Event::Leave(&user);
                let _ = node
                    .broker
                    .presence_sync(&channel, &members, Some(event))
                    .await;
            });
        }
    }

    /// `presence` and `presence_count`: the channel's members across nodes.
    async fn presence(&mut self, id: Option<RequestId>, channel: &str, count_only: bool) {
        let refusal = if let Err(error) = channel::validate_name(channel) {
            Some((ErrorCode::InvalidChannel, error.to_string()))
        } else if !self.principal.may_subscribe(channel) {
            Some((
                ErrorCode::Forbidden,
                "the token does not grant this channel".to_owned(),
            ))
        } else if self.node.hub.presence_rule(channel).is_none() {
            Some((
                ErrorCode::NotSupported,
                "presence is not enabled on this channel".to_owned(),
            ))
        } else {
            None
        };
        let members = match refusal {
            Some(refusal) => Err(refusal),
            None => self
                .node
                .broker
                .presence_read(channel)
                .await
                .map_err(|e| (ErrorCode::BrokerUnavailable, e.to_string())),
        };
        let members = match members {
            Ok(members) => members,
            Err((code, message)) => {
                self.node.metrics.client_error(code);
                self.outbox.push_reply(
                    ServerFrame::Reply {
                        id,
                        channels: None,
                        errors: None,
                        positions: None,
                        presence: None,
                        users: None,
                        connections: None,
                        revoked: None,
                        expires_at: None,
                        error: Some(ReplyError { code, message }),
                    }
                    .encode(),
                );
                return;
            }
        };
        let connections: u64 = members.values().map(|c| u64::from(*c)).sum();
        let listed: Vec<PresenceUser<'_>> = match count_only {
            true => Vec::new(),
            false => members
                .iter()
                .take(self.node.config.presence.max_users)
                .map(|(user, connections)| PresenceUser {
                    user,
                    connections: *connections,
                })
                .collect(),
        };
        self.outbox.push_reply(
            ServerFrame::Reply {
                id,
                channels: None,
                errors: None,
                positions: None,
                presence: (!count_only).then_some(listed.as_slice()),
                users: count_only.then_some(members.len() as u64),
                connections: count_only.then_some(connections),
                revoked: None,
                expires_at: None,
                error: None,
            }
            .encode(),
        );
    }

    /// One pattern of a subscribe (`prices.*`): refused, or added to the hub.
    fn subscribe_pattern(
        &mut self,
        name: &str,
        joining: usize,
        added: &mut Vec<Arc<str>>,
    ) -> Option<(ErrorCode, String)> {
        let max_channels = self.node.config.limits.max_channels_per_connection;
        let pattern = match Pattern::parse(name) {
            Ok(pattern) => pattern,
            Err(error) => return Some((ErrorCode::InvalidChannel, error.to_string())),
        };
        if !self.node.broker.supports_patterns() {
            return Some((
                ErrorCode::NotSupported,
                "pattern subscriptions are not supported with Redis Cluster".to_owned(),
            ));
        }
        if !self.principal.may_subscribe_pattern(&pattern) {
            return Some((
                ErrorCode::Forbidden,
                "the token does not grant every channel this pattern matches".to_owned(),
            ));
        }
        if self.channels.contains_key(name) {
            return None;
        }
        if self.channels.len() + joining >= max_channels {
            return Some((
                ErrorCode::LimitExceeded,
                format!("at most {max_channels} channels per connection"),
            ));
        }
        let sub = self
            .node
            .hub
            .subscribe_pattern(self.id, &self.outbox, &pattern);
        self.channels.insert(sub.channel.clone(), sub.key);
        added.push(sub.channel);
        None
    }

    /// A client's publish: checked, rate-limited, then published through the
    /// broker exactly like `POST /api/publish`.
    async fn publish(&mut self, id: Option<RequestId>, channel: String, data: String) {
        let outcome = self.try_publish(&channel, data).await;
        self.node
            .metrics
            .client_publish(outcome.as_ref().err().map(|e| e.0));
        let error = match outcome {
            Ok(()) => None,
            Err((code, message)) => {
                self.node.metrics.client_error(code);
                Some(ReplyError { code, message })
            }
        };
        self.outbox.push_reply(
            ServerFrame::Reply {
                id,
                channels: None,
                errors: None,
                positions: None,
                presence: None,
                users: None,
                connections: None,
                revoked: None,
                expires_at: None,
                error,
            }
            .encode(),
        );
    }

    async fn try_publish(
        &mut self,
        channel: &str,
        data: String,
    ) -> Result<(), (ErrorCode, String)> {
        if let Err(error) = channel::validate_name(channel) {
            return Err((ErrorCode::InvalidChannel, error.to_string()));
        }
        if !self.principal.may_publish(channel) {
            return Err((
                ErrorCode::Forbidden,
                "the token does not grant publishing to this channel".to_owned(),
            ));
        }
        let limits = &self.node.config.limits;
        if data.len() > limits.max_publish_bytes {
            return Err((
                ErrorCode::TooLarge,
                format!("data is limited to {} bytes", limits.max_publish_bytes),
            ));
        }
        let now = tokio::time::Instant::now();
        let buckets = self.publish_limits.get_or_insert_with(|| {
            let bytes = limits.publish_bytes_per_second as f64;
            Box::new((
                TokenBucket::new(limits.publish_per_second, limits.publish_burst as f64, now),
                TokenBucket::new(bytes, bytes.max(limits.max_publish_bytes as f64), now),
            ))
        });
        let (messages, bytes) = &mut **buckets;
        if !messages.try_take(now) {
            return Err((
                ErrorCode::RateLimited,
                format!(
                    "at most {} publishes per second; retry in {} ms",
                    limits.publish_per_second,
                    messages.retry_after().as_millis().max(1)
                ),
            ));
        }
        if !bytes.try_take_n(data.len() as f64, now) {
            return Err((
                ErrorCode::RateLimited,
                format!(
                    "at most {} published bytes per second",
                    limits.publish_bytes_per_second
                ),
            ));
        }
        let payload = match self.node.hub.stamps_from(channel) {
            true => Bytes::from(protocol::stamp_from(&self.principal.user, data.as_bytes())),
            false => Bytes::from(data),
        };
        match self.node.broker.publish(channel, payload).await {
            Ok(_) => Ok(()),
            Err(error) => Err((ErrorCode::BrokerUnavailable, error.to_string())),
        }
    }

    fn leave(&mut self, channel: &str) -> bool {
        self.presence_left(channel);
        match self.channels.remove(channel) {
            Some(key) => {
                self.node.hub.unsubscribe(self.id, channel);
                self.outbox.forget(key);
                true
            }
            None => false,
        }
    }

    fn unsubscribe(&mut self, id: Option<RequestId>, requested: Vec<String>) {
        if self.too_many_channels(id, &requested) {
            return;
        }
        for name in &requested {
            self.leave(name);
        }
        self.outbox.push_reply(
            ServerFrame::Reply {
                id,
                channels: Some(&requested),
                errors: None,
                positions: None,
                presence: None,
                users: None,
                connections: None,
                revoked: None,
                expires_at: None,
                error: None,
            }
            .encode(),
        );
    }

    async fn refresh(&mut self, id: Option<RequestId>, token: &str) {
        match self.node.auth.refresh(&self.principal, token).await {
            Ok(principal) => {
                self.outbox.set_expires_at(principal.expires_at);
                self.principal = principal;
                // A narrower token takes effect at once.
                let revoked: Vec<String> = self
                    .channels
                    .keys()
                    .filter(|channel| !self.principal.may_hold(channel))
                    .map(|channel| channel.to_string())
                    .collect();
                for channel in &revoked {
                    self.leave(channel);
                }
                self.outbox.push_reply(
                    ServerFrame::Reply {
                        id,
                        channels: None,
                        errors: None,
                        positions: None,
                        presence: None,
                        users: None,
                        connections: None,
                        revoked: Some(&revoked),
                        expires_at: Some(self.principal.expires_at),
                        error: None,
                    }
                    .encode(),
                );
            }
            Err(AuthError::SubjectChanged) => {
                // Another user's token on this connection: end it.
                self.node.metrics.auth_failed(&AuthError::SubjectChanged);
                self.outbox.close(CloseCode::Forbidden);
            }
            Err(error) => {
                self.node.metrics.auth_failed(&error);
                self.node.metrics.client_error(ErrorCode::InvalidToken);
                self.outbox.push_reply(
                    ServerFrame::Reply {
                        id,
                        channels: None,
                        errors: None,
                        positions: None,
                        presence: None,
                        users: None,
                        connections: None,
                        revoked: None,
                        expires_at: None,
                        error: Some(ReplyError {
                            code: ErrorCode::InvalidToken,
                            message: format!("{} ({})", error, error.code()),
                        }),
                    }
                    .encode(),
                );
            }
        }
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncated("abcdef".into(), 3), "abc");
        assert_eq!(truncated("abc".into(), 3), "abc");
        assert_eq!(truncated("aé".into(), 2), "a");
    }
}
