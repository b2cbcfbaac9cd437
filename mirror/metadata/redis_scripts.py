"""The Lua scripts of the Redis metadata store (`mirror.metadata.redis`): each changes
several keys at once, atomically, so indexes and totals never drift. Key names follow the
layout in `mirror.metadata.redis_keys`; per-digest names are derived from the prefix inside the
scripts, which is why the store needs a standalone Redis, not Redis Cluster."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

ADD_CONTENT = """
-- KEYS: sizes, used, content, totals, holders of the digest
-- ARGV: digest, size, at[, holder]
local new = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
if new == 1 then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  redis.call('ZADD', KEYS[3], 0, ARGV[1])
  redis.call('HINCRBY', KEYS[4], 'bytes', ARGV[2])
  redis.call('HINCRBY', KEYS[4], 'entries', 1)
else
  redis.call('ZADD', KEYS[2], 'GT', ARGV[3], ARGV[1])
end
if ARGV[4] then redis.call('SADD', KEYS[5], ARGV[4]) end
return new
"""

DROP_CONTENT = """
-- KEYS: sizes, used, content, totals, then the holders of each digest; ARGV: the digests
local freed, count = 0, 0
for i, digest in ipairs(ARGV) do
  local size = redis.call('HGET', KEYS[1], digest)
  if size then
    redis.call('HDEL', KEYS[1], digest)
    redis.call('ZREM', KEYS[2], digest)
    redis.call('ZREM', KEYS[3], digest)
    freed = freed + tonumber(size)
    count = count + 1
  end
  redis.call('DEL', KEYS[4 + i])
end
if count > 0 then
  -- '%d': a plain number argument would be sent in '%.14g' form
  redis.call('HINCRBY', KEYS[4], 'bytes', string.format('%d', -freed))
  redis.call('HINCRBY', KEYS[4], 'entries', -count)
end
return string.format('%d', freed)
"""

# A repository stays listed while a tag or a ref names it.
DROP_REPO_IF_EMPTY = """
local function drop_repo_if_empty(tags, repos, refnames, repo, lo, hi)
  if redis.call('ZCARD', tags) == 0
      and #redis.call('ZRANGEBYLEX', refnames, lo, hi, 'LIMIT', 0, 1) == 0 then
    redis.call('ZREM', repos, repo)
  end
end
"""

SET_TAG = """
-- KEYS: the tag's records, the repository's tags, repos
-- ARGV: names prefix, tag, repo member, name member, digest, record, Accept fields...
local function named()
  local seen = {}
  for _, v in ipairs(redis.call('HVALS', KEYS[1])) do seen[cjson.decode(v).digest] = true end
  return seen
end
local before = named()
for i = 7, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], ARGV[6]) end
local after = named()
for digest in pairs(before) do
  if not after[digest] then redis.call('ZREM', ARGV[1] .. digest, ARGV[4]) end
end
redis.call('ZADD', ARGV[1] .. ARGV[5], 0, ARGV[4])
redis.call('ZADD', KEYS[2], 0, ARGV[2])
redis.call('ZADD', KEYS[3], 0, ARGV[3])
return 1
"""

DROP_TAG = DROP_REPO_IF_EMPTY + """
-- KEYS: the tag's records, the repository's tags, repos, refnames, pulls
-- ARGV: names prefix, tag, repo member, name member, refs of the repo (lo, hi), pulls member
local seen, out = {}, {}
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do
  local digest = cjson.decode(v).digest
  if not seen[digest] then
    seen[digest] = true
    out[#out + 1] = digest
    redis.call('ZREM', ARGV[1] .. digest, ARGV[4])
  end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[5], ARGV[7])
drop_repo_if_empty(KEYS[2], KEYS[3], KEYS[4], ARGV[3], ARGV[5], ARGV[6])
return out
"""

# Counts only tags with a record (bounded by them; DROP_TAG forgets a tag's count).
ADD_PULLS = """
-- KEYS: pulls, then the records of each tag; ARGV: the members, then their counts
local n = #ARGV / 2
for i = 1, n do
  if redis.call('EXISTS', KEYS[1 + i]) == 1 then
    redis.call('ZINCRBY', KEYS[1], ARGV[n + i], ARGV[i])
  end
end
return 1
"""

DROP_REF = DROP_REPO_IF_EMPTY + """
-- KEYS: refs, the repository's tags, repos, refnames, names of the digest
-- ARGV: ref member, name member, repo member, refs of the repo (lo, hi)
local gone = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[2])
drop_repo_if_empty(KEYS[2], KEYS[3], KEYS[4], ARGV[3], ARGV[4], ARGV[5])
return gone
"""

UNPIN = """
-- KEYS: pins; ARGV: pinners prefix, owner, the owner's pins (lo, hi)
local members = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[3], ARGV[4])
redis.call('ZREMRANGEBYLEX', KEYS[1], ARGV[3], ARGV[4])
local out = {}
for i, member in ipairs(members) do
  local digest = string.sub(member, #ARGV[2] + 2)
  redis.call('SREM', ARGV[1] .. digest, ARGV[2])
  out[i] = digest
end
return out
"""

GRANT = """
-- KEYS: the repository's grants, transient grants; ARGV: identity, at, durable (1/0), member
-- The value's text is written here only, so its "at" is read back by position.
local at, durable = ARGV[2], ARGV[3] == '1'
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local old = string.match(current, '^{"at": ([^,]+),')
  if tonumber(old) > tonumber(at) then at = old end
  durable = durable or string.find(current, '"durable": true', 1, true) ~= nil
end
redis.call('HSET', KEYS[1], ARGV[1], '{"at": ' .. at .. ', "durable": ' .. tostring(durable) .. '}')
if durable then
  redis.call('ZREM', KEYS[2], ARGV[4])
else
  redis.call('ZADD', KEYS[2], at, ARGV[4])
end
return 1
"""

PRUNE_GRANTS = """
-- KEYS: transient grants, then each grant's repository hash
-- ARGV: before, the members, then their identities (a member still older than `before` goes)
local n = (#ARGV - 1) / 2
local removed = 0
for i = 1, n do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[1 + i])
  if score and tonumber(score) < tonumber(ARGV[1]) then
    redis.call('ZREM', KEYS[1], ARGV[1 + i])
    redis.call('HDEL', KEYS[1 + i], ARGV[1 + n + i])
    removed = removed + 1
  end
end
return removed
"""

# Keyset pagination over (score, member) of a sorted set: entries after (ARGV[1], ARGV[2])
# and scored below ARGV[3], at most ARGV[4]. Within equal scores Redis orders members by
# bytes; the comparison here is bytewise too (Lua's `<` follows the server's locale).
PAGE_BY_SCORE = """
local function le(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a <= #b
end
local key, start = KEYS[1], 0
if ARGV[1] ~= '' then
  local lo = redis.call('ZCOUNT', key, '-inf', '(' .. ARGV[1])
  local hi = lo + redis.call('ZCOUNT', key, ARGV[1], ARGV[1])
  while lo < hi do  -- the first of the equal scores whose member sorts after ARGV[2]
    local mid = math.floor((lo + hi) / 2)
    if le(redis.call('ZRANGE', key, mid, mid)[1], ARGV[2]) then lo = mid + 1 else hi = mid end
  end
  start = lo
end
local rows = redis.call('ZRANGE', key, start, start + tonumber(ARGV[4]) - 1, 'WITHSCORES')
local out, limit = {}, tonumber(ARGV[3])
for i = 1, #rows, 2 do
  if tonumber(rows[i + 1]) >= limit then break end
  out[#out + 1] = rows[i]
  out[#out + 1] = rows[i + 1]
end
return out
"""

ACQUIRE = """
-- KEYS: the lock; ARGV: owner, lease in milliseconds
local owner = redis.call('GET', KEYS[1])
if owner == false or owner == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

RELEASE = """
-- KEYS: the lock; ARGV: owner
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class Scripts:
    add_content: AsyncScript
    drop_content: AsyncScript
    set_tag: AsyncScript
    drop_tag: AsyncScript
    add_pulls: AsyncScript
    drop_ref: AsyncScript
    unpin: AsyncScript
    grant: AsyncScript
    prune_grants: AsyncScript
    page_by_score: AsyncScript
    acquire: AsyncScript
    release: AsyncScript

    @classmethod
    def register(cls, client: aioredis.Redis) -> Scripts:
        return cls(*(client.register_script(text) for text in (
            ADD_CONTENT, DROP_CONTENT, SET_TAG, DROP_TAG, ADD_PULLS, DROP_REF, UNPIN, GRANT,
            PRUNE_GRANTS, PAGE_BY_SCORE, ACQUIRE, RELEASE)))
