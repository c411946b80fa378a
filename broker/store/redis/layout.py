"""The Redis store's key layout: every key name is built here and nowhere else.

``P`` is the configured prefix (``kb`` by default, never holding ``{`` or ``}``); ``T`` is
an account's slot tag, the first 12 hex digits of the BLAKE2b hash of its name
(``base.account_tag``), also the last 12 hex digits of each of its lease ids.

=============================  ======  ===============================  ======================  =========
pattern                        type    holds                            TTL                     hash tag
=============================  ======  ===============================  ======================  =========
P:{T}:w:<window name>          string  a window's count of units        window end + margin     {T}
P:{S}:w:<window name>          string  a window spanning accounts       window end + margin     {S} [2]
                                       (name starts with SHARED_WINDOW:
                                       a principal's own limit)
P:{T}:ends                     zset    the account's window names,      none (prune trims it)   {T}
                                       scored by when each ends
P:{T}:lease:<lease id>         hash    one lease: LeaseRecord's         ``retention`` past the  {T}
                                       fields and ``ik``, its           lease's end (renewal
                                       idempotency key's name           extends it)
P:{T}:active                   zset    the account's active lease ids,  none (ids leave on      {T}
                                       scored by expiry                 end)
P:{T}:done                     zset    its ended lease ids, scored by   none (prune trims it)   {T}
                                       when they ended
P:accounts                     hash    T -> account name: the accounts  none                    none
                                       to sweep, list and prune
P:idem:<n>:<principal>:<rid>   string  the lease id a request_id was    the lease's TTL         none [1]
                                       granted; on a cluster while      (renewal extends it;
                                       claimed, "<lease id> <deadline   prune deletes it with
                                       ms>"                             its lease)
P:{T}:health                   hash    subject -> JSON Health: the      none                    {T}
                                       account's and its keys' records
                                       (read by every reservation)
P:{T}:stats                    hash    key_id -> JSON KeyStats of the   none                    {T}
                                       account's keys
P:{T}:udays                    zset    the days the account has usage   none (prune trims it)   {T}
                                       (score 0, read by name)
P:{T}:u:<day>                  set     the account's usage rows of the  none (prune drops the   {T}
                                       day: JSON [key_id, account,      day)
                                       model, principal]
P:{T}:u:<day>:<row>            hash    one row's counters and latency   none (prune drops the   {T}
                                       buckets                          day)
=============================  ======  ===============================  ======================  =========

``<n>`` is the principal's length, so no principal/request_id pair can spell another's;
``<rid>`` is the request_id.
[2] ``{S}`` is the fixed tag ``{shared}``: a window that spans accounts cannot share their
slots, so a reservation that charges one touches two slots. That is one atomic script on a
single Redis; Redis Cluster refuses it, so principal limits are refused with a cluster.
[1] The idempotency key has no tag of its own (braces in a principal or request_id could
make one); it is always alone in its call on a cluster, so any slot will do.

Health, statistics and usage live in their account's slot, so a reservation checks health
and a report applies everything it changes in one script on one slot (a key's records live
with the account it is in).

Lua scripts get every key they touch in KEYS, except where a script walks an index whose
members name keys (expiry, pruning, live counts, usage rows): there Python passes the
prefix from here (``window_prefix``, ``lease_prefix``, ``usage_row_prefix``) in ARGV and the
script appends a member, always inside the index's own hash tag, so a cluster routes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..base import SHARED_WINDOW, TAG_HEX

__all__ = ["Layout", "ttl_ms"]


def ttl_ms(ends_at: float, now: float, margin: float) -> int:
    """A relative TTL in ms, from the broker's clock: ``margin`` seconds past ``ends_at``, at
    least a second (a clock in the past must not make Redis drop a live key)."""
    return max(int((ends_at - now + margin) * 1000), 1000)


@dataclass(frozen=True)
class Layout:
    """The key names of one store (one prefix)."""

    prefix: str

    def _account(self, tag: str, suffix: str) -> str:
        return f"{self.prefix}:{{{tag}}}:{suffix}"

    # -- per account (hash tag {T}) ------------------------------------------------------------

    def window(self, tag: str, name: str) -> str:
        """The count of window ``name`` of the account tagged ``tag`` (or, for a window that
        spans accounts, ``shared_window(name)``)."""
        if name.startswith(SHARED_WINDOW):
            return self.shared_window_prefix() + name
        return self._account(tag, f"w:{name}")

    def shared_window_prefix(self) -> str:
        """The key of a window spanning accounts, less its name (it has the fixed tag
        ``{shared}``): for scripts refunding a lease's windows."""
        return f"{self.prefix}:{{shared}}:w:"

    def window_prefix(self, tag: str) -> str:
        """``window(tag, name)`` less the name: for scripts walking ``ends``."""
        return self._account(tag, "w:")

    def ends(self, tag: str) -> str:
        """The account's window names, scored by when they end."""
        return self._account(tag, "ends")

    def lease(self, lease_id: str) -> str:
        """A lease, in the slot of the account tagged by the id's last 12 hex digits."""
        return self._account(lease_id[-TAG_HEX:], f"lease:{lease_id}")

    def lease_prefix(self, tag: str) -> str:
        """``lease(id)`` less the id: for scripts walking ``active`` or ``done``."""
        return self._account(tag, "lease:")

    def active(self, tag: str) -> str:
        """The account's active lease ids, scored by expiry."""
        return self._account(tag, "active")

    def done(self, tag: str) -> str:
        """The account's ended lease ids, scored by when they ended."""
        return self._account(tag, "done")

    # -- store-wide --------------------------------------------------------------------------

    def accounts(self) -> str:
        """The account directory: tag -> account name."""
        return f"{self.prefix}:accounts"

    def idem(self, principal: str, request_id: str) -> str:
        """The idempotency record (or cluster claim) of a principal's request_id."""
        return f"{self.prefix}:idem:{len(principal)}:{principal}:{request_id}"

    # -- health, statistics, usage (per account, hash tag {T}) ---------------------------------

    def health(self, tag: str) -> str:
        """Health records (subject -> JSON) of the account tagged ``tag`` and of its keys."""
        return self._account(tag, "health")

    def stats(self, tag: str) -> str:
        """Statistics (key_id -> JSON) of the account's keys."""
        return self._account(tag, "stats")

    def usage_days(self, tag: str) -> str:
        """The days the account has usage rows."""
        return self._account(tag, "udays")

    def usage_day(self, tag: str, day: str) -> str:
        """The set of the account's usage rows of a day."""
        return self._account(tag, f"u:{day}")

    def usage_row(self, tag: str, day: str, row: str) -> str:
        """One usage row of a day."""
        return self.usage_row_prefix(tag, day) + row

    def usage_row_prefix(self, tag: str, day: str) -> str:
        """``usage_row(tag, day, row)`` less the row: for scripts walking ``usage_day``."""
        return f"{self.usage_day(tag, day)}:"
