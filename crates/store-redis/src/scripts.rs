//! The Lua scripts of the writes (a read needs none: `HGETALL`, expiry
//! checked by the client). Each does the least work inside Redis, where
//! every `redis.call` costs about half a microsecond of a single-threaded
//! server: one `HGET` of the packed metadata, one `HSET`, and `PEXPIRE`
//! only when the expiry passes the key's TTL (see `Meta::collect_after`).
//! Every script refuses to resurrect a session that is gone or expired at
//! the caller's clock, and checks the size limit before writing anything.
//!
//! A change has two paths. When the caller knows the metadata it read (it
//! keeps recently read sessions) and sends it, and Redis holds exactly that
//! metadata (so that version of every attribute), the caller has already
//! checked the expiry, the conditions and the size and computed the new
//! metadata: the script compares one string and writes. Otherwise the
//! script parses the metadata and does the work itself (`HSTRLEN` of the
//! changed attributes for the size).
//!
//! The last `ARGV` of each is `track`: `1` when the near cache follows the
//! session. The script then reads the metadata once more at the end: in
//! `CLIENT TRACKING OPTIN` mode (after `CLIENT CACHING yes`) a read inside
//! the script registers the key for the caller again, which the script's own
//! write had cleared (with `NOLOOP` the caller hears of other clients'
//! writes only).

/// Shared Lua: the metadata (see `layout.rs`), expiry and the key's TTL.
const META: &str = r"
local function tether_meta(m)
  local v, last, idle, deadline, created, size, gc =
    string.match(m, '^(%d+),(%d+),(%d+),(%d+),(%d+),(%d+),(%d+)$')
  if not v then return nil end
  return tonumber(v), tonumber(last), tonumber(idle), tonumber(deadline),
    tonumber(created), tonumber(size), tonumber(gc)
end
local function tether_pack(v, last, idle, deadline, created, size, gc)
  return string.format('%d,%d,%d,%d,%d,%d,%d', v, last, idle, deadline, created, size, gc)
end
local function tether_expires(last, idle, deadline)
  local e = last + idle
  if deadline > 0 and deadline < e then e = deadline end
  return e
end
-- Moves the key's TTL a quarter of the inactivity window past the expiry
-- when the expiry passed it; returns the new gc (Meta::collect_after).
local function tether_gc(key, now, last, idle, deadline, gc)
  local e = tether_expires(last, idle, deadline)
  if e <= gc then return gc end
  local g = e + math.floor(idle / 4)
  if deadline > 0 and g > deadline then g = deadline end
  local ttl = g - now
  if ttl < 1 then ttl = 1 end
  redis.call('PEXPIRE', key, string.format('%d', ttl))
  return g
end
-- Lua's unpack has a limit of a few thousand values: write in chunks.
local function tether_chunked(cmd, key, list)
  local i = 1
  while i <= #list do
    local last = math.min(i + 199, #list)
    redis.call(cmd, key, unpack(list, i, last))
    i = last + 1
  end
end
";

/// Shared Lua: apply a delta. ARGV from 1: now, limit, clear, idle (-1 =
/// unchanged), the metadata the caller read ('' if unknown), the new
/// metadata, the new TTL ('0': keep), nsets, name/json pairs, nremoves,
/// names, nexpect, name/present ('1'/'0')/json triples (conditions), track.
/// Returns the new metadata; false if there is no live session;
/// {'conflict'} if a condition does not hold; {'too_large', size}; the
/// last two without writing anything.
const APPLY_FN: &str = r"
local function tether_apply(key, a)
  local m = redis.call('HGET', key, 'm')
  if not m then return false end
  local nsets = tonumber(a[8])
  local sets_at = 9
  local nrem = tonumber(a[sets_at + 2 * nsets])
  local rem_at = sets_at + 2 * nsets + 1
  local nexp = tonumber(a[rem_at + nrem])
  local exp_at = rem_at + nrem + 1
  local track = a[exp_at + 3 * nexp] == '1'
  local sets = {'m', a[6]}
  for i = 0, nsets - 1 do
    sets[#sets + 1] = 'attr:' .. a[sets_at + 2 * i]
    sets[#sets + 1] = a[sets_at + 2 * i + 1]
  end
  if m == a[5] then
    -- What the caller read is what is here: it did the checks and the
    -- arithmetic (its removals are of attributes this version has).
    tether_chunked('HSET', key, sets)
    if nrem > 0 then
      local rems = {}
      for i = 0, nrem - 1 do rems[#rems + 1] = 'attr:' .. a[rem_at + i] end
      tether_chunked('HDEL', key, rems)
    end
    if a[7] ~= '0' then redis.call('PEXPIRE', key, a[7]) end
    if track then redis.call('HGET', key, 'm') end
    return a[6]
  end
  local v, last, idle, deadline, created, size, gc = tether_meta(m)
  if not v then return redis.error_reply('tether: malformed session metadata') end
  local now = tonumber(a[1])
  if now >= tether_expires(last, idle, deadline) then return false end
  for i = 0, nexp - 1 do
    local j = exp_at + 3 * i
    local have = redis.call('HGET', key, 'attr:' .. a[j])
    if a[j + 1] == '1' then
      if have ~= a[j + 2] then return {'conflict'} end
    elseif have then
      return {'conflict'}
    end
  end
  local clear = a[3] == '1'
  if clear then size = 0 end
  for i = 0, nsets - 1 do
    local name, val = a[sets_at + 2 * i], a[sets_at + 2 * i + 1]
    if not clear then
      local old = redis.call('HSTRLEN', key, 'attr:' .. name)
      if old > 0 then size = size - old - #name end
    end
    size = size + #name + #val
  end
  local rems = {}
  for i = 0, nrem - 1 do
    local name = a[rem_at + i]
    if not clear then
      local old = redis.call('HSTRLEN', key, 'attr:' .. name)
      if old > 0 then
        size = size - old - #name
        rems[#rems + 1] = 'attr:' .. name
      end
    end
  end
  if size > tonumber(a[2]) then return {'too_large', string.format('%d', size)} end
  if clear then
    for _, f in ipairs(redis.call('HKEYS', key)) do
      if string.sub(f, 1, 5) == 'attr:' then rems[#rems + 1] = f end
    end
  end
  tether_chunked('HDEL', key, rems)
  local new_idle = tonumber(a[4])
  -- A new inactivity timeout (longer or shorter) sets the TTL afresh: a
  -- session given a shorter one must not outlive it in Redis.
  if new_idle >= 0 then idle = new_idle; gc = 0 end
  if now > last then last = now end
  v = v + 1
  gc = tether_gc(key, now, last, idle, deadline, gc)
  sets[2] = tether_pack(v, last, idle, deadline, created, size, gc)
  tether_chunked('HSET', key, sets)
  if track then redis.call('HGET', key, 'm') end
  return sets[2]
end
";

/// KEYS[1] session; ARGV: now, the metadata, the TTL, track, then attribute
/// field/value pairs. Returns 1 if created, 0 if a live session holds the ID.
pub(crate) fn create() -> String {
    format!(
        "{META}{}",
        r"
local key = KEYS[1]
local now = tonumber(ARGV[1])
local m = redis.call('HGET', key, 'm')
if m then
  local _, last, idle, deadline = tether_meta(m)
  if last and now < tether_expires(last, idle, deadline) then return 0 end
  redis.call('DEL', key)
end
local sets = {'m', ARGV[2]}
for i = 5, #ARGV, 2 do
  sets[#sets + 1] = ARGV[i]
  sets[#sets + 1] = ARGV[i + 1]
end
tether_chunked('HSET', key, sets)
redis.call('PEXPIRE', key, ARGV[3])
if ARGV[4] == '1' then redis.call('HGET', key, 'm') end
return 1
"
    )
}

/// KEYS[1] session; ARGV as `tether_apply`.
pub(crate) fn apply() -> String {
    format!("{META}{APPLY_FN}return tether_apply(KEYS[1], ARGV)\n")
}

/// KEYS[1] session; ARGV: now, track. Records an access (the lazy expiry
/// refresh): returns the new metadata, or false if the session is gone.
pub(crate) fn touch() -> String {
    format!(
        "{META}{}",
        r"
local key = KEYS[1]
local now = tonumber(ARGV[1])
local m = redis.call('HGET', key, 'm')
if not m then return false end
local v, last, idle, deadline, created, size, gc = tether_meta(m)
if not v or now >= tether_expires(last, idle, deadline) then return false end
if now > last then
  last = now
  gc = tether_gc(key, now, last, idle, deadline, gc)
  m = tether_pack(v, last, idle, deadline, created, size, gc)
  redis.call('HSET', key, 'm', m)
end
if ARGV[2] == '1' then redis.call('HGET', key, 'm') end
return m
"
    )
}

/// KEYS[1] old, KEYS[2] new (one node: standalone or Sentinel); ARGV as
/// `tether_apply`. Returns the new metadata, false, {'too_large', n},
/// {'conflict'} or {'collision'}; nothing changes unless it returns the
/// metadata.
pub(crate) fn rotate() -> String {
    format!(
        "{META}{APPLY_FN}{}",
        r"
local now = tonumber(ARGV[1])
local m = redis.call('HGET', KEYS[2], 'm')
if m then
  local _, last, idle, deadline = tether_meta(m)
  if last and now < tether_expires(last, idle, deadline) then return {'collision'} end
  redis.call('DEL', KEYS[2])
end
local r = tether_apply(KEYS[1], ARGV)
if type(r) == 'string' then
  redis.call('RENAME', KEYS[1], KEYS[2])
  if ARGV[#ARGV] == '1' then redis.call('HGET', KEYS[2], 'm') end
end
return r
"
    )
}
