-- write_permits.lua: a batch's permits and ACKs, atomically (SPEC §4-§6,
-- §12, §13). Every guard that must hold at the instant of the write lives
-- here: the no-overwrite rule, the trading state (kill switch), the
-- reconcile hold, then the open throttles. A change made before this script
-- runs is in force for every permit it writes, and the throttles' counts are
-- shared by every instance.
--
-- KEYS[1]  quantum:p33:trading_state (the global state; set by the latch)
-- KEYS[2]  quantum:p33:opens (global open throttle, sorted set)
-- KEYS[3]  quantum:stream:p33.control (the latch's control entry)
-- KEYS[4]  quantum:p33:open_positions (symbols granted an open while flat,
--          sorted set scored by the time, ms; P33_MAX_OPEN_POSITIONS)
-- KEYS[5]  quantum:stream:p33.decisions (the decision record, SPEC §14)
-- KEYS     then per entry i, four keys from KEYS[6 + 4(i-1)]:
--            quantum:permit:p33:<plan_id>          (written)
--            quantum:reconcile:hold:<symbol>       (read)
--            quantum:p33:trading_state:<symbol>    (read)
--            quantum:p33:opens:<symbol>            (per-symbol throttle)
--          An ACK-only entry fills its slots with unused names.
-- ARGV[1]  the plan stream
-- ARGV[2]  the consumer group
-- ARGV[3]  the permit TTL, ms
-- ARGV[4]  the global state while KEYS[1] is missing (P33_DEFAULT_TRADING_STATE)
-- ARGV[5]  '1' in dry run: ACK and decide, write nothing
-- ARGV[6]  the trading_halted deny template, ARGV[7] the trading_reducing
--          one: permit JSON with the literals __SCOPE__ ("global" or
--          "symbol"), __PLAN__ (the plan_id, JSON-escaped) and __SYMBOL__
--          where they go; the plan_id and the symbol are taken from the
--          entry's permit and hold keys
-- ARGV[8]  P33_MAX_OPENS limit (0: off)       ARGV[9]  its window, ms
-- ARGV[10] P33_MAX_OPENS_PER_SYMBOL limit     ARGV[11] its window, ms
-- ARGV[12] the throttled deny template, global scope; ARGV[13] symbol scope
--          (the same placeholders; limit and window already filled in)
-- ARGV[14] '1': P33_THROTTLE_LATCH            ARGV[15] the latch's reason
-- ARGV[16] P33_MAX_OPEN_POSITIONS (0: off)     ARGV[17] the permit TTL, ms
-- ARGV[18] how many allowlisted symbols hold a position now
-- ARGV[19] those symbols, comma separated
-- ARGV[20] the max_open_positions deny template (placeholders as above,
--          plus "__POSITIONS__" and "__INFLIGHT__", quotes included, where
--          the two counts go as numbers)
-- ARGV[21] P33_DECISIONS_MAXLEN (0: no record)  ARGV[22] the config hash
-- ARGV[23] the version                           ARGV[24] the consumer name
-- ARGV     then per entry i, eleven values from ARGV[25 + 11(i-1)] (four,
--          from ARGV[25 + 4(i-1)], when the record is off):
--            entry ID, mode, permit body, hold-deny body, then the record:
--            plan_id, symbol, outcome ('' for an evaluated plan: the script
--            decides allow/deny/dry_run_*), reason (the rules'), safe_qty,
--            plan JSON, inputs JSON (an object the script extends with
--            "guards": what the state, hold and limit checks read)
--          mode '0' = ACK only
--               '1' = a deny, written as evaluated
--               '2' = an allow that closes: trading state, then hold
--               '3' = an allow that opens: trading state (REDUCING too), then hold
--               '4' = a reconcile-close allow: trading state only
--
-- A state is ACTIVE, REDUCING or HALTED (any case); any other value, or a
-- key of another type, is HALTED (fail closed). A plan's state is the
-- stricter of the global one and its symbol's.
--
-- Returns one code per entry:
--   0  the entry was not pending any more (another consumer finished it):
--      nothing written
--   1  ACKed, no permit (as asked)
--   2  ACKed, permit written as evaluated
--   3  ACKed, hold denial written instead of the allow
--   4  ACKed, nothing written: a permit for this plan_id already exists
--      (an earlier entry with the same id); a permit is never overwritten
--   5  ACKed, trading_halted written (global)      6  the same, symbol
--   7  ACKed, trading_reducing written (global)    8  the same, symbol
--   9  ACKed, throttled written (global)          10  the same, symbol
--  1000 + n  ACKed, max_open_positions written, n symbols in flight
-- In dry run the codes say what would have been written, and nothing is
-- counted or latched.
--
-- The throttles count opening allows that are written (after the state
-- and the hold): each is a member (its entry ID) of the sorted sets, scored
-- by the server's time, ms; members older than the window are dropped
-- first. When the latch is on, the first global throttled deny also sets
-- the global state to REDUCING (if it was ACTIVE) with a control entry by
-- p33-auto; the rest of the batch sees REDUCING.
--
-- The position cap: an open is denied when the symbols holding a position
-- plus the symbols granted an open within the permit TTL that still hold
-- none reach P33_MAX_OPEN_POSITIONS; a granted open adds its symbol (once:
-- the set is keyed by symbol).

local RANK = {ACTIVE = 1, REDUCING = 2, HALTED = 3}

local function state_of(key, default)
  local t = redis.call('TYPE', key).ok
  if t == 'none' then return default end
  if t ~= 'string' then return 'HALTED' end
  local v = string.upper(redis.call('GET', key))
  v = string.match(v, '^%s*(.-)%s*$')
  if RANK[v] then return v end
  return 'HALTED'
end

-- The deny a trading state writes, from its template. Replacements go
-- through functions, so no character of a plan_id is read as a pattern.
local PERMIT_PREFIX, HOLD_PREFIX = 'quantum:permit:p33:', 'quantum:reconcile:hold:'
local function trading_deny(template, scope, permit_key, hold_key)
  local plan = string.sub(permit_key, #PERMIT_PREFIX + 1)
  local symbol = string.sub(hold_key, #HOLD_PREFIX + 1)
  local plan_esc = string.gsub(plan, '[\\"]', function(c) return '\\' .. c end)
  local body = string.gsub(template, '__SCOPE__', function() return scope end)
  body = string.gsub(body, '__PLAN__', function() return plan_esc end)
  body = string.gsub(body, '__SYMBOL__', function() return symbol end)
  return body
end

local stream, group, ttl, dry = ARGV[1], ARGV[2], ARGV[3], ARGV[5] == '1'
local halted_tmpl, reducing_tmpl = ARGV[6], ARGV[7]
local max_g, win_g = tonumber(ARGV[8]), tonumber(ARGV[9])
local max_s, win_s = tonumber(ARGV[10]), tonumber(ARGV[11])
local throttled_g, throttled_s = ARGV[12], ARGV[13]
local latch, latch_reason = ARGV[14] == '1', ARGV[15]
local cap, cap_ttl, positions = tonumber(ARGV[16]), tonumber(ARGV[17]), tonumber(ARGV[18])
local positioned = {}
for s in string.gmatch(ARGV[19], '[^,]+') do positioned[s] = true end
local cap_tmpl = ARGV[20]
local global = state_of(KEYS[1], ARGV[4])
local now_ms = 0
if max_g > 0 or max_s > 0 or cap > 0 then
  local t = redis.call('TIME')
  now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Whether the sorted set `key` holds `limit` members younger than `win` ms,
-- and how many it holds.
local function full(key, limit, win)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. (now_ms - win))
  local c = redis.call('ZCARD', key)
  return c >= limit, c
end

-- Symbols granted an open within the TTL that still hold no position.
local function in_flight()
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. (now_ms - cap_ttl))
  local n = 0
  for _, s in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
    if not positioned[s] then n = n + 1 end
  end
  return n
end

-- The final reason of a guard's code.
local GUARD_REASON = {
  [3] = 'reconcile_hold_active', [5] = 'trading_halted', [6] = 'trading_halted',
  [7] = 'trading_reducing', [8] = 'trading_reducing', [9] = 'throttled', [10] = 'throttled',
}

local maxlen, cfg_hash, version, consumer = tonumber(ARGV[21]), ARGV[22], ARGV[23], ARGV[24]

-- With the record off, entries carry no record values.
local stride = 4
if maxlen > 0 then stride = 11 end
local out = {}
local n = (#ARGV - 24) / stride
for i = 1, n do
  local a = 24 + (i - 1) * stride
  local k = 5 + (i - 1) * 4
  local id, mode = ARGV[a + 1], ARGV[a + 2]
  local guards = {}
  local acked = redis.call('XACK', stream, group, id)
  if acked == 0 then
    out[i] = 0
  elseif mode == '0' then
    out[i] = 1
  elseif (not dry) and redis.call('EXISTS', KEYS[k + 1]) == 1 then
    out[i] = 4
  else
    local body, res = ARGV[a + 3], 2
    if mode ~= '1' then
      local state, scope, shift = global, 'global', 0
      local sym = state_of(KEYS[k + 3], nil)
      if sym and RANK[sym] > RANK[global] then state, scope, shift = sym, 'symbol', 1 end
      table.insert(guards, '"state":"' .. state .. '","scope":"' .. scope .. '"')
      if state == 'HALTED' then
        body, res = trading_deny(halted_tmpl, scope, KEYS[k + 1], KEYS[k + 2]), 5 + shift
      elseif state == 'REDUCING' and mode == '3' then
        body, res = trading_deny(reducing_tmpl, scope, KEYS[k + 1], KEYS[k + 2]), 7 + shift
      elseif mode ~= '4' then
        local hk = KEYS[k + 2]
        local t = redis.call('TYPE', hk).ok
        local held = false
        if t == 'string' then
          held = string.len(redis.call('GET', hk)) > 0
        elseif t ~= 'none' then
          held = true
        end
        table.insert(guards, '"hold":' .. tostring(held))
        if held then body, res = ARGV[a + 4], 3 end
      end
      if res == 2 and mode == '3' then
        if max_g > 0 then
          local is_full, c = full(KEYS[2], max_g, win_g)
          table.insert(guards, '"opens_global":' .. c)
          if is_full then
            body, res = trading_deny(throttled_g, 'global', KEYS[k + 1], KEYS[k + 2]), 9
            if latch and global == 'ACTIVE' and not dry then
              redis.call('SET', KEYS[1], 'REDUCING')
              redis.call('XADD', KEYS[3], '*', 'scope', 'global', 'symbol', '', 'from', 'ACTIVE',
                'to', 'REDUCING', 'reason', latch_reason, 'actor', 'p33-auto',
                'ts', tostring(math.floor(now_ms / 1000)))
              global = 'REDUCING'
            end
          end
        end
        if res == 2 and max_s > 0 then
          local is_full, c = full(KEYS[k + 4], max_s, win_s)
          table.insert(guards, '"opens_symbol":' .. c)
          if is_full then
            body, res = trading_deny(throttled_s, 'symbol', KEYS[k + 1], KEYS[k + 2]), 10
          end
        end
        if res == 2 and cap > 0 then
          local flying = in_flight()
          table.insert(guards, '"positions":' .. positions .. ',"in_flight":' .. flying)
          if positions + flying >= cap then
            -- The quoted placeholders become bare numbers.
            local t = string.gsub(cap_tmpl, '"__POSITIONS__"', tostring(positions))
            t = string.gsub(t, '"__INFLIGHT__"', tostring(flying))
            body, res = trading_deny(t, 'global', KEYS[k + 1], KEYS[k + 2]), 1000 + flying
          end
        end
        if res == 2 and not dry then
          if max_g > 0 then
            redis.call('ZADD', KEYS[2], now_ms, id)
            redis.call('PEXPIRE', KEYS[2], win_g)
          end
          if max_s > 0 then
            redis.call('ZADD', KEYS[k + 4], now_ms, id)
            redis.call('PEXPIRE', KEYS[k + 4], win_s)
          end
          if cap > 0 then
            local symbol = string.sub(KEYS[k + 2], #HOLD_PREFIX + 1)
            redis.call('ZADD', KEYS[4], now_ms, symbol)
            redis.call('PEXPIRE', KEYS[4], cap_ttl)
          end
        end
      end
    end
    if not dry then
      redis.call('SET', KEYS[k + 1], body, 'PX', ttl, 'NX')
    end
    out[i] = res
  end
  -- The record of every entry finished here (none for one another consumer
  -- had already finished).
  if maxlen > 0 and out[i] ~= 0 then
    local code = out[i]
    local outcome, reason, qty, inputs = ARGV[a + 7], ARGV[a + 8], ARGV[a + 9], ARGV[a + 11]
    if outcome == '' then
      if code == 4 then
        outcome, reason, qty = 'duplicate_plan_id', 'duplicate_plan_id', ''
      else
        local allowed = code == 2 and mode ~= '1'
        if code >= 1000 then
          reason = 'max_open_positions'
        elseif GUARD_REASON[code] then
          reason = GUARD_REASON[code]
        end
        if not allowed then qty = '' end
        if allowed then outcome = 'allow' else outcome = 'deny' end
        if dry then outcome = 'dry_run_' .. outcome end
      end
      if #guards > 0 then
        inputs = string.sub(inputs, 1, -2) .. ',"guards":{' .. table.concat(guards, ',') .. '}}'
      end
    end
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', maxlen, '*',
      'plan_id', ARGV[a + 5], 'entry_id', id, 'symbol', ARGV[a + 6], 'outcome', outcome,
      'reason', reason, 'safe_qty', qty, 'plan', ARGV[a + 10], 'inputs', inputs,
      'config', cfg_hash, 'version', version, 'consumer', consumer)
  end
end
return out
