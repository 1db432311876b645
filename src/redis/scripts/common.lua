-- common.lua: functions put in front of the scripts that need them
-- (src/redis/scripts.rs).
--
-- state_of: how every script reads a trading state (SPEC §12), so the write
-- script, ctl and the metrics read a value the same way. The Rust reading
-- of the same rule is domain::TradingState::from_stored_bytes.
--
-- A state is ACTIVE, REDUCING or HALTED (any case, ASCII blanks trimmed);
-- any other value, a value longer than 16 bytes (bounded before any string
-- work: no value may make a script run long), or a key of another type, is
-- HALTED (fail closed). A missing key is `default`.

local RANK = {ACTIVE = 1, REDUCING = 2, HALTED = 3}

local function state_of(key, default)
  local t = redis.call('TYPE', key).ok
  if t == 'none' then return default end
  if t ~= 'string' then return 'HALTED' end
  if redis.call('STRLEN', key) > 16 then return 'HALTED' end
  local v = string.upper(redis.call('GET', key))
  v = string.match(v, '^%s*(.-)%s*$')
  if RANK[v] then return v end
  return 'HALTED'
end

-- Why a stream cannot take an XADD (nil when it can).
local MAX_ID = '18446744073709551615-18446744073709551615'
local function stream_problem(key)
  local t = redis.call('TYPE', key).ok
  if t == 'none' then return nil end
  if t ~= 'stream' then return 'holds a ' .. t end
  local info = redis.call('XINFO', 'STREAM', key)
  for j = 1, #info - 1, 2 do
    if info[j] == 'last-generated-id' then
      if info[j + 1] == MAX_ID then return 'is at its last possible ID' end
      return nil
    end
  end
  return nil
end

-- guard_deny: the deny a guard writes, from its template (a permit JSON with
-- __SCOPE__, __PLAN__ and __SYMBOL__ where they go). Replacements go through
-- functions, so no character of a plan_id is read as a pattern.
local PERMIT_PREFIX, HOLD_PREFIX = 'quantum:permit:p33:', 'quantum:reconcile:hold:'
local STATE_PREFIX = 'quantum:p33:trading_state:'
local function guard_deny(template, scope, permit_key, hold_key)
  local plan = string.sub(permit_key, #PERMIT_PREFIX + 1)
  local symbol = string.sub(hold_key, #HOLD_PREFIX + 1)
  local plan_esc = string.gsub(plan, '[\\"]', function(c) return '\\' .. c end)
  local body = string.gsub(template, '__SCOPE__', function() return scope end)
  body = string.gsub(body, '__PLAN__', function() return plan_esc end)
  body = string.gsub(body, '__SYMBOL__', function() return symbol end)
  return body
end

