//! The Lua scripts that make each store operation one atomic round trip.
//!
//! Layout of a session: one hash at `PREFIX{ID}` (the ID is a hash tag, so on
//! Redis Cluster everything of a session sits in one slot). Fields:
//! `attr:NAME` holds an attribute as JSON; `meta:created`, `meta:last`,
//! `meta:idle`, `meta:deadline` (0 = none) are milliseconds, `meta:version`
//! counts deltas, `meta:size` is the attribute bytes (names plus JSON), kept
//! so a delta's size check costs O(changed attributes). The key's TTL follows
//! the sliding expiry, but every script also checks expiry against the
//! caller's clock, so Redis eviction and tether's rules can never disagree
//! in the user's favour.

/// Shared Lua: expiry of a session from its meta fields.
const EXPIRY: &str = r"
local function tether_expires(last, idle, deadline)
  local e = last + idle
  if deadline > 0 and deadline < e then e = deadline end
  return e
end
-- Lua's unpack has a limit of a few thousand values: write in chunks.
local function tether_chunked(cmd, key, list, from)
  local i = from or 1
  while i <= #list do
    local last = math.min(i + 199, #list)
    redis.call(cmd, key, unpack(list, i, last))
    i = last + 1
  end
end
";

/// Shared Lua: apply a delta. ARGV from index `i`: now, limit, clear,
/// idle (-1 = unchanged), nsets, name/json pairs, nremoves, names, nexpect,
/// name/present('1' or '0')/json triples (the delta's conditions).
/// Returns the new version, false if there is no live session,
/// {'conflict'} if a condition does not hold, or {'too_large', size}, the
/// last two without writing anything.
const APPLY_FN: &str = r"
local function tether_apply(key, a, i)
  local now = tonumber(a[i])
  local limit = tonumber(a[i + 1])
  local clear = a[i + 2] == '1'
  local new_idle = tonumber(a[i + 3])
  local m = redis.call('HMGET', key, 'meta:last', 'meta:idle', 'meta:deadline', 'meta:size')
  if not m[1] then return false end
  local last, idle, deadline, size = tonumber(m[1]), tonumber(m[2]), tonumber(m[3]), tonumber(m[4])
  if now >= tether_expires(last, idle, deadline) then
    redis.call('DEL', key)
    return false
  end
  if clear then size = 0 end
  local nsets = tonumber(a[i + 4])
  local j = i + 5
  local sets = {}
  for _ = 1, nsets do
    local name, val = a[j], a[j + 1]
    if not clear then
      local old = redis.call('HSTRLEN', key, 'attr:' .. name)
      if old > 0 then size = size - old - #name end
    end
    size = size + #name + #val
    sets[#sets + 1] = 'attr:' .. name
    sets[#sets + 1] = val
    j = j + 2
  end
  local nrem = tonumber(a[j])
  j = j + 1
  local rems = {}
  for _ = 1, nrem do
    local name = a[j]
    if not clear then
      local old = redis.call('HSTRLEN', key, 'attr:' .. name)
      if old > 0 then
        size = size - old - #name
        rems[#rems + 1] = 'attr:' .. name
      end
    end
    j = j + 1
  end
  local nexp = tonumber(a[j]) or 0
  j = j + 1
  for _ = 1, nexp do
    local have = redis.call('HGET', key, 'attr:' .. a[j])
    if a[j + 1] == '1' then
      if have ~= a[j + 2] then return {'conflict'} end
    elseif have then
      return {'conflict'}
    end
    j = j + 3
  end
  if size > limit then return {'too_large', string.format('%d', size)} end
  if clear then
    for _, f in ipairs(redis.call('HKEYS', key)) do
      if string.sub(f, 1, 5) == 'attr:' then redis.call('HDEL', key, f) end
    end
  end
  tether_chunked('HDEL', key, rems)
  tether_chunked('HSET', key, sets)
  if new_idle >= 0 then
    idle = new_idle
    redis.call('HSET', key, 'meta:idle', a[i + 3])
  end
  if now > last then
    last = now
    redis.call('HSET', key, 'meta:last', a[i])
  end
  redis.call('HSET', key, 'meta:size', string.format('%d', size))
  local v = redis.call('HINCRBY', key, 'meta:version', 1)
  local ttl = tether_expires(last, idle, deadline) - now
  if ttl < 1 then ttl = 1 end
  redis.call('PEXPIRE', key, string.format('%d', ttl))
  return v
end
";

/// KEYS[1] session; ARGV: now, refresh_after ms (-1: none), refresh fraction
/// of the session's own idle timeout (-1: none).
/// Returns the hash as a flat array, or false.
pub(crate) fn load() -> String {
    format!(
        "{EXPIRY}{}",
        r"
local key = KEYS[1]
local now = tonumber(ARGV[1])
local refresh_after = tonumber(ARGV[2])
local fraction = tonumber(ARGV[3])
local h = redis.call('HGETALL', key)
if #h == 0 then return false end
local last, idle, deadline
for i = 1, #h, 2 do
  local f = h[i]
  if f == 'meta:last' then last = tonumber(h[i + 1])
  elseif f == 'meta:idle' then idle = tonumber(h[i + 1])
  elseif f == 'meta:deadline' then deadline = tonumber(h[i + 1]) end
end
if not (last and idle and deadline) then return redis.error_reply('tether: session hash without meta fields') end
local expires = tether_expires(last, idle, deadline)
if now >= expires then
  redis.call('DEL', key)
  return false
end
local threshold = refresh_after
if fraction >= 0 then
  local t = idle * fraction
  if threshold < 0 or t < threshold then threshold = t end
end
if threshold >= 0 and now - last >= threshold then
  redis.call('HSET', key, 'meta:last', ARGV[1])
  local ttl = tether_expires(now, idle, deadline) - now
  if ttl < 1 then ttl = 1 end
  redis.call('PEXPIRE', key, string.format('%d', ttl))
  for i = 1, #h, 2 do
    if h[i] == 'meta:last' then h[i + 1] = ARGV[1] end
  end
end
return h
"
    )
}

/// KEYS[1] session; ARGV: now, ttl, then field/value pairs.
/// Returns 1 if created, 0 if a live session holds the ID.
pub(crate) fn create() -> String {
    format!(
        "{EXPIRY}{}",
        r"
local key = KEYS[1]
local now = tonumber(ARGV[1])
local m = redis.call('HMGET', key, 'meta:last', 'meta:idle', 'meta:deadline')
if m[1] then
  if now < tether_expires(tonumber(m[1]), tonumber(m[2]), tonumber(m[3])) then return 0 end
  redis.call('DEL', key)
end
tether_chunked('HSET', key, ARGV, 3)
redis.call('PEXPIRE', key, ARGV[2])
return 1
"
    )
}

/// KEYS[1] session; ARGV as `tether_apply`.
pub(crate) fn apply() -> String {
    format!("{EXPIRY}{APPLY_FN}return tether_apply(KEYS[1], ARGV, 1)\n")
}

/// KEYS[1] old, KEYS[2] new (one node: standalone or Sentinel); ARGV as
/// `tether_apply`. Returns the version, false, {'too_large', n} or
/// {'collision'}; nothing changes unless it returns a version.
pub(crate) fn rotate() -> String {
    format!(
        "{EXPIRY}{APPLY_FN}{}",
        r"
local now = tonumber(ARGV[1])
local m = redis.call('HMGET', KEYS[2], 'meta:last', 'meta:idle', 'meta:deadline')
if m[1] then
  if now < tether_expires(tonumber(m[1]), tonumber(m[2]), tonumber(m[3])) then return {'collision'} end
  redis.call('DEL', KEYS[2])
end
local r = tether_apply(KEYS[1], ARGV, 1)
if type(r) == 'number' then redis.call('RENAME', KEYS[1], KEYS[2]) end
return r
"
    )
}
