-- revoke.lua: one bounded step of a halt's revocation of the allows not yet
-- used (SPEC §12, RTS 6 Art. 12): up to ARGV[14] members of one index are
-- taken; each whose permit still exists and still holds an allow is
-- rewritten, keeping its TTL, into the deny of the new state, and recorded;
-- every member taken leaves the index (revoked, or no allow any more), so
-- each step makes progress and none walks the world. The caller repeats the
-- step until it says done: the state change already stops new allows, so
-- steps are safe, and each one stays within a few milliseconds of script
-- time (another client never waits longer).
--
-- Which index: for HALTED the index of every allow (global
-- quantum:p33:allows, members `<symbol>|<plan_id>`, or the symbol's
-- quantum:p33:allows:<symbol>, members `<plan_id>`); for REDUCING the index
-- of the opening allows only (quantum:p33:allows:opens or
-- quantum:p33:allows:<symbol>:opens): a close is never walked past again
-- and again.
--
-- One confirmation entry per halt entry, whichever instance is first: the
-- marker (SET NX) names the instance that walks, with its count so far
-- (what ctl prints while it waits); that instance, restarted, resumes.
-- The one sanctioned overwrite of a permit: allow -> deny.
--
-- KEYS[1]  the index to walk (a sorted set scored by expiry, ms)
-- KEYS[2]  quantum:stream:p33.control (the confirmation)
-- KEYS[3]  quantum:p33:revoked:<halt entry ID> (the marker)
-- KEYS[4]  quantum:stream:p33.revocations (one record per revoked permit)
-- KEYS[5]  the state key of the scope (quantum:p33:trading_state[:<symbol>])
-- ARGV[1]  scope: global or symbol         ARGV[2]  the symbol ('' global)
-- ARGV[3]  the state: HALTED or REDUCING   ARGV[4]  the halt entry's ID
-- ARGV[5]  its reason                      ARGV[6]  actor (p33-revoke@<consumer>)
-- ARGV[7]  the marker's TTL, ms
-- ARGV[8]  the deny template (__SCOPE__, __PLAN__, __SYMBOL__)
-- ARGV[9]  the revocation record's MAXLEN (0: no record)
-- ARGV[10] config hash    ARGV[11] version    ARGV[12] consumer
-- ARGV[13] the state in force while KEYS[5] is missing
-- ARGV[14] members per step
-- ARGV[15] revoked so far by earlier steps
-- ARGV[16] '1' on the first step of this walk
-- ARGV[17] the step's time budget, µs: the step ends early once it has
--          used it (checked every 8 members), whatever the load
--
-- Returns {revoked in this step, done (0/1)}; {-1, 1} when another
-- instance walks (or walked) this entry; {-2, 1} when the state is no
-- longer that strict (an old entry replayed after a crash, once an operator
-- had resumed: nothing is revoked, and a walk cut short that way is
-- confirmed with what it did); an error reply P33REVOKE <key> <why>
-- (nothing written) when a key it must write cannot take it.

local t = redis.call('TYPE', KEYS[1]).ok
if t ~= 'none' and t ~= 'zset' then
  return redis.error_reply('P33REVOKE ' .. KEYS[1] .. ' holds a ' .. t)
end
for _, k in ipairs({KEYS[2], KEYS[4]}) do
  local why = stream_problem(k)
  if why then return redis.error_reply('P33REVOKE ' .. k .. ' ' .. why) end
end
local mt = redis.call('TYPE', KEYS[3]).ok
if mt ~= 'none' and mt ~= 'string' then
  return redis.error_reply('P33REVOKE ' .. KEYS[3] .. ' holds a ' .. mt)
end

local scope, symbol, to = ARGV[1], ARGV[2], ARGV[3]
local consumer = ARGV[12]
local so_far = tonumber(ARGV[15]) or 0
local tm = redis.call('TIME')
local now_ms = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)

-- The confirmation: exactly one per halt entry, from the walking instance.
local function confirm(n)
  redis.call('XADD', KEYS[2], '*', 'kind', 'revoked', 'scope', scope, 'symbol', symbol,
    'reason', ARGV[5], 'actor', ARGV[6], 'ts', tostring(math.floor(now_ms / 1000)),
    'ref', ARGV[4], 'revoked', tostring(n))
  redis.call('SET', KEYS[3], consumer .. ' ' .. n .. ' done', 'KEEPTTL')
end

local strict = (RANK[state_of(KEYS[5], ARGV[13])] or 0) >= (RANK[to] or 3)
if ARGV[16] == '1' then
  if not strict then return {-2, 1} end
  if not redis.call('SET', KEYS[3], consumer .. ' 0', 'NX', 'PX', ARGV[7]) then
    -- Another instance walks it, or this one (restarted) did: only this
    -- one's unfinished walk is resumed.
    local m = redis.call('GET', KEYS[3])
    if #m > 256 or string.sub(m, 1, #consumer + 1) ~= consumer .. ' '
        or string.sub(m, -5) == ' done' then
      return {-1, 1}
    end
    so_far = tonumber(string.match(m, ' (%d+)$')) or 0
  end
elseif not strict then
  -- Resumed meanwhile: the walk stops, confirmed with what it did.
  confirm(so_far)
  return {-2, 1}
end

local reason = 'trading_halted'
if to == 'REDUCING' then reason = 'trading_reducing' end
local maxlen = tonumber(ARGV[9])
local limit = tonumber(ARGV[14]) or 100
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now_ms, '+inf', 'LIMIT', 0, limit)
local budget = tonumber(ARGV[17]) or 4000
local started_us = tonumber(tm[1]) * 1000000 + tonumber(tm[2])
local cut = false
local n = 0
for i, member in ipairs(members) do
  if i % 8 == 0 then
    local c = redis.call('TIME')
    if tonumber(c[1]) * 1000000 + tonumber(c[2]) - started_us >= budget then
      cut = true
      break
    end
  end
  local sym, plan
  if scope == 'symbol' then
    sym, plan = symbol, member
  else
    sym, plan = string.match(member, '^([^|]*)|(.*)$')
  end
  if sym and plan then
    local key = PERMIT_PREFIX .. plan
    -- Only our own verdicts, bounded before any string work.
    if redis.call('TYPE', key).ok == 'string' and redis.call('STRLEN', key) <= 4096 then
      local body = redis.call('GET', key)
      local allow = string.find(body, '"allow":true', 1, true)
      local open = string.find(body, '"reason":"open_permit_granted"', 1, true)
      if allow and (to == 'HALTED' or open) then
        local deny = guard_deny(ARGV[8], scope, key, HOLD_PREFIX .. sym)
        redis.call('SET', key, deny, 'KEEPTTL')
        n = n + 1
        if maxlen > 0 then
          redis.call('XADD', KEYS[4], 'MAXLEN', '~', maxlen, '*',
            'plan_id', plan, 'entry_id', '', 'symbol', sym, 'outcome', 'revoked',
            'reason', reason, 'safe_qty', '', 'plan', '{}',
            'inputs', '{"revoked_by":' .. cjson.encode(ARGV[4]) .. '}',
            'config', ARGV[10], 'version', ARGV[11], 'consumer', consumer)
        end
      end
    end
  end
  redis.call('ZREM', KEYS[1], member)
end
-- The expired ones are no allows any more.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now_ms)
local total = so_far + n
if not cut and #members < limit then
  confirm(total)
  return {n, 1}
end
redis.call('SET', KEYS[3], consumer .. ' ' .. total, 'KEEPTTL')
return {n, 0}
