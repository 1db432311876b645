-- revoke.lua: a halt revokes the allows not yet used (SPEC §12, RTS 6
-- Art. 12): every indexed permit that still exists and still holds an allow
-- (of the symbol, for a symbol scope) is rewritten, keeping its TTL, into
-- the deny of the new state — for REDUCING, only the opening allows. One
-- confirmation entry per halt entry, whichever instance is first (the
-- marker, set NX). The one sanctioned overwrite of a permit: allow -> deny.
--
-- KEYS[1]  quantum:p33:allows (`<symbol>|<plan_id>` scored by expiry, ms)
-- KEYS[2]  quantum:stream:p33.control (the confirmation)
-- KEYS[3]  quantum:p33:revoked:<halt entry ID> (the marker)
-- KEYS[4]  quantum:stream:p33.decisions (one record per revoked permit)
-- ARGV[1]  scope: global or symbol         ARGV[2]  the symbol ('' global)
-- ARGV[3]  the state: HALTED or REDUCING   ARGV[4]  the halt entry's ID
-- ARGV[5]  its reason                      ARGV[6]  actor (p33-revoke@<consumer>)
-- ARGV[7]  the marker's TTL, ms
-- ARGV[8]  the deny template (__SCOPE__, __PLAN__, __SYMBOL__)
-- ARGV[9]  P33_DECISIONS_MAXLEN (0: no record)
-- ARGV[10] config hash    ARGV[11] version    ARGV[12] consumer
-- KEYS[5]  the state key of the scope (quantum:p33:trading_state[:<symbol>])
-- ARGV[13] the state in force while KEYS[5] is missing
--
-- Returns the number revoked, -1 when another instance had confirmed this
-- entry already, -2 when the state is no longer that strict (the entry is
-- old: replayed after a crash, and an operator resumed since): nothing is
-- revoked then; an error reply P33REVOKE <key> <why> (nothing
-- written) when a key it must write cannot take it.

local t = redis.call('TYPE', KEYS[1]).ok
if t ~= 'none' and t ~= 'zset' then
  return redis.error_reply('P33REVOKE ' .. KEYS[1] .. ' holds a ' .. t)
end
for _, k in ipairs({KEYS[2], KEYS[4]}) do
  local why = stream_problem(k)
  if why then return redis.error_reply('P33REVOKE ' .. k .. ' ' .. why) end
end
if (RANK[state_of(KEYS[5], ARGV[13])] or 0) < (RANK[ARGV[3]] or 3) then return -2 end
if not redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[7]) then return -1 end

local scope, symbol, to = ARGV[1], ARGV[2], ARGV[3]
local reason = 'trading_halted'
if to == 'REDUCING' then reason = 'trading_reducing' end
local maxlen = tonumber(ARGV[9])
local tm = redis.call('TIME')
local now_ms = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local n = 0
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now_ms, '+inf')) do
  local sym, plan = string.match(member, '^([^|]*)|(.*)$')
  if sym and (scope ~= 'symbol' or sym == symbol) then
    local key = PERMIT_PREFIX .. plan
    -- Only our own verdicts, bounded before any string work.
    if redis.call('TYPE', key).ok == 'string' and redis.call('STRLEN', key) <= 4096 then
      local body = redis.call('GET', key)
      local allow = string.find(body, '"allow":true', 1, true)
      local open = string.find(body, '"reason":"open_permit_granted"', 1, true)
      if allow and (to == 'HALTED' or open) then
        local deny = guard_deny(ARGV[8], scope, key, HOLD_PREFIX .. sym)
        redis.call('SET', key, deny, 'KEEPTTL')
        redis.call('ZREM', KEYS[1], member)
        n = n + 1
        if maxlen > 0 then
          redis.call('XADD', KEYS[4], 'MAXLEN', '~', maxlen, '*',
            'plan_id', plan, 'entry_id', '', 'symbol', sym, 'outcome', 'revoked',
            'reason', reason, 'safe_qty', '', 'plan', '{}',
            'inputs', '{"revoked_by":' .. cjson.encode(ARGV[4]) .. '}',
            'config', ARGV[10], 'version', ARGV[11], 'consumer', ARGV[12])
        end
      end
    end
  end
end
redis.call('XADD', KEYS[2], '*', 'scope', scope, 'symbol', symbol, 'from', to, 'to', to,
  'reason', ARGV[5], 'actor', ARGV[6], 'ts', tostring(math.floor(now_ms / 1000)),
  'ref', ARGV[4], 'revoked', tostring(n))
return n
