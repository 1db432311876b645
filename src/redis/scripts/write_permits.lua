-- write_permits.lua: a batch's permits and ACKs, atomically (SPEC §4-§6,
-- §11-§13). Every guard that must hold at the instant of the write lives
-- here: the no-overwrite rule (and the replacement of foreign permits), the
-- trading state (kill switch), the reconcile hold, then the open throttles
-- and the position cap. A change made before this script runs is in force
-- for every permit it writes, and the limits' counts are shared by every
-- instance.
--
-- Nothing that can fail is done after the first write: every key the
-- script may write or read with a typed command is checked first (its type,
-- a stream's last ID), because Redis keeps a script's writes made before an
-- error. The decision record's stream unusable -> an error reply before any
-- write (P33GUARD <key> <why>): the batch stays pending. A counter key or
-- the control stream unusable -> the opens that need it are denied
-- invalid_guard_state {key}.
--
-- KEYS[1]  quantum:p33:trading_state (the global state; set by the latch)
-- KEYS[2]  quantum:p33:opens:<window>ms (global open throttle, sorted set;
--          one per window, so instances with different windows never trim
--          each other's counts)
-- KEYS[3]  quantum:stream:p33.control (the latch's control entry)
-- KEYS[4]  quantum:p33:open_positions (symbols granted an open while flat,
--          sorted set scored by the time, ms; P33_MAX_OPEN_POSITIONS)
-- KEYS[5]  quantum:stream:p33.decisions (the decision record, SPEC §14)
-- KEYS[6]  quantum:p33:latch (set to the latch's control entry ID when the
--          latch trips: what ctl status and the alert report)
-- KEYS[7]  quantum:p33:allows (every allow written, `<symbol>|<plan_id>`
--          scored by its expiry, ms: what a halt revokes, SPEC §12)
-- KEYS[8]  quantum:p33:armed (read: the marker that a gate put the trading
--          state in place, SPEC §12)
-- KEYS[9]  quantum:p33:allows:opens (the opening allows of KEYS[7]: what a
--          global reduce revokes)
-- KEYS     then per entry i, five keys from KEYS[10 + 5(i-1)]:
--            quantum:permit:p33:<plan_id>           (written)
--            quantum:p33:trading_state:<symbol>     (read)
--            quantum:p33:opens:<window>ms:<symbol>  (per-symbol throttle)
--            quantum:p33:allows:<symbol>            (the symbol's allows,
--                                                    `<plan_id>` by expiry)
--            quantum:p33:allows:<symbol>:opens      (its opening allows)
--          A halt walks only the index of its scope (and a reduce only the
--          opens'), in bounded steps (revoke.lua).
--          An ACK-only entry fills its slots with unused names.
--          quantum:reconcile:hold:<symbol> is read but not declared: a
--          declared key counts as written for the ACL (SPEC §17), and the
--          reconcile engine's hold is only read here. Its name is built from
--          the state key's symbol.
--
-- ARGV[1]  the batch's settings, one JSON object (decoded once):
--            stream, group        the plan stream and its consumer group
--            ttl                  the permit TTL, ms
--            default_state        the global state while KEYS[1] is missing
--            known, known_sym     the trading state the instance knows from
--                                 the control log ('' / {} when it knows
--                                 none): the global one, and the overrides
--                                 of the batch's symbols; the stricter of
--                                 them and the keys is enforced, so a looser
--                                 key written by hand is never in force
--            known_id             the last control entry the known state
--                                 folds in: when the control stream holds a
--                                 newer one (a change the instance has not
--                                 read yet, written with its key in one
--                                 step), the keys alone are enforced
--            knows                true when the instance knows the state:
--                                 while KEYS[8] is missing the batch is then
--                                 refused (P33UNARMED, nothing written) and
--                                 retried once the instance has restored the
--                                 keys and armed; false (a dry run, or an
--                                 instance that knows nothing): every
--                                 evaluated plan is denied
--                                 trading_state_unknown (a dry run records
--                                 what the state would do, armed or not)
--            unknown              that deny's template
--            dry                  true in dry run: ACK and decide, write nothing
--            halted, reducing     the trading_halted / trading_reducing deny
--                                 templates: permit JSON with the literals
--                                 __SCOPE__ ("global" or "symbol"), __PLAN__
--                                 (the plan_id, JSON-escaped) and __SYMBOL__;
--                                 the plan_id and the symbol are taken from
--                                 the entry's permit and hold keys
--            guard                the invalid_guard_state template (__KEY__
--                                 where the broken key's name goes)
--            max_g, win_g         P33_MAX_OPENS limit (0: off), window ms
--            max_s, win_s         P33_MAX_OPENS_PER_SYMBOL, the same
--            throttled_g, throttled_s   the throttled templates
--            latch, latch_reason  P33_THROTTLE_LATCH and the entry's reason
--            cap                  P33_MAX_OPEN_POSITIONS (0: off)
--            positioned           the allowlisted symbols holding a position
--            cap_tmpl             the max_open_positions template ("__POSITIONS__"
--                                 and "__INFLIGHT__", quotes included, where
--                                 the two counts go as numbers)
--            maxlen               P33_DECISIONS_MAXLEN (0: no record)
--            config, version, consumer   the record's fields
-- ARGV     then per entry i, eleven values from ARGV[2 + 11(i-1)] (four,
--          from ARGV[2 + 4(i-1)], when the record is off):
--            entry ID, mode, permit body, hold-deny body, then the record:
--            plan_id, symbol, outcome ('' for an evaluated plan: the script
--            decides allow/deny/dry_run_*), reason (the rules'), safe_qty,
--            plan JSON, inputs JSON (an object the script extends with
--            "guards": what the state, hold and limit checks read)
--          mode '0' = ACK only
--               '1' = a deny, written as evaluated
--               '2' = an allow that closes: trading state, then hold
--               '3' = an allow that opens: trading state (REDUCING too), hold,
--                     then the limits
--               '4' = a reconcile-close allow: trading state only
--
-- A state is read by state_of (common.lua, put in front of this script):
-- anything but ACTIVE/REDUCING/HALTED is HALTED. A plan's state is the
-- stricter of the global one and its symbol's.
--
-- Returns one code per entry, then, for each entry whose permit key held
-- another type (a foreign permit, SPEC §6) that was deleted and replaced,
-- two more values: the entry's position (1-based) and '<type>:<its reason
-- field, or ->'. (A flat array: a table per entry costs Redis about 1 µs
-- each.) Codes:
--   0  the entry was not pending any more (another consumer finished it):
--      nothing written
--   1  ACKed, no permit (as asked)
--   2  ACKed, permit written as evaluated
--   3  ACKed, hold denial written instead of the allow
--   4  ACKed, nothing written: a permit (a string) for this plan_id already
--      exists (an earlier entry with the same id); a verdict is never
--      overwritten
--   5  ACKed, trading_halted written (global)      6  the same, symbol
--   7  ACKed, trading_reducing written (global)    8  the same, symbol
--   9  ACKed, throttled written (global)          10  the same, symbol
--  11  ACKed, invalid_guard_state written: KEYS[2] unusable
--  12  the same, the entry's per-symbol throttle key
--  13  the same, KEYS[4]                          14  the same, KEYS[3]
--  15  the same, KEYS[7] (the allows a halt revokes)
--  16  ACKed, trading_state_unknown written: KEYS[8] is missing
--  17  ACKed, invalid_guard_state written: KEYS[9] unusable
--  18  the same, the entry's quantum:p33:allows:<symbol>
--  19  the same, the entry's quantum:p33:allows:<symbol>:opens
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

-- Whether a counter key can be counted in (a sorted set, or missing).
local function zset_ok(key)
  local t = redis.call('TYPE', key).ok
  return t == 'none' or t == 'zset'
end

-- What a foreign permit said, for the record and the log: its type and its
-- reason field (printable ASCII, at most 64 bytes; read only when short).
local function foreign_of(key, t)
  local reason = '-'
  if t == 'hash' then
    local len = redis.call('HSTRLEN', key, 'reason')
    if len > 1024 then
      reason = '(long)'
    elseif len > 0 then
      reason = string.sub(string.gsub(redis.call('HGET', key, 'reason'), '[^%w%p ]', '?'), 1, 64)
    end
  end
  return t .. ':' .. reason
end

local h = cjson.decode(ARGV[1])

local stream, group, ttl, dry = h.stream, h.group, h.ttl, h.dry
local max_g, win_g, max_s, win_s = h.max_g, h.win_g, h.max_s, h.win_s
local latch, cap = h.latch and max_g > 0, h.cap
local positions = #h.positioned
local positioned = {}
for _, s in ipairs(h.positioned) do positioned[s] = true end
local maxlen = h.maxlen
-- The stricter of two states (either may be nil or '').
local function stricter(a, b)
  if not RANK[a] then return b end
  if not RANK[b] then return a end
  if RANK[b] > RANK[a] then return b end
  return a
end
local known, known_sym = h.known, h.known_sym
if type(known_sym) ~= 'table' then known_sym = {} end
if h.known_id ~= '' and redis.call('TYPE', KEYS[3]).ok == 'stream'
    and #redis.call('XRANGE', KEYS[3], '(' .. h.known_id, '+', 'COUNT', 1) > 0 then
  known, known_sym = '', {}
end
local global = stricter(state_of(KEYS[1], h.default_state), known)
local armed = dry or redis.call('EXISTS', KEYS[8]) == 1
if not armed and h.knows then
  return redis.error_reply('P33UNARMED ' .. KEYS[8] .. ' is missing')
end

-- The record's stream is checked before anything is written: a record that
-- cannot be written leaves the whole batch pending.
if maxlen > 0 then
  local why = stream_problem(KEYS[5])
  if why then return redis.error_reply('P33GUARD ' .. KEYS[5] .. ' ' .. why) end
end
-- The shared guard keys the opens need; a broken one denies them.
local broken_g = max_g > 0 and not zset_ok(KEYS[2])
local broken_cap = cap > 0 and not zset_ok(KEYS[4])
local broken_ctl = latch and stream_problem(KEYS[3]) ~= nil
-- An allow a halt could not revoke is not written: opens are denied while
-- the index holds another type (closes go on: they reduce risk).
local broken_allows = not zset_ok(KEYS[7])
local broken_opens_index = not zset_ok(KEYS[9])

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local indexed = false

-- Whether the sorted set `key` holds `limit` members younger than `win` ms,
-- and how many it holds.
local function full(key, limit, win)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. (now_ms - win))
  local c = redis.call('ZCARD', key)
  return c >= limit, c
end

-- Symbols granted an open within the TTL that still hold no position.
local function in_flight()
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. (now_ms - ttl))
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
  [11] = 'invalid_guard_state', [12] = 'invalid_guard_state',
  [13] = 'invalid_guard_state', [14] = 'invalid_guard_state', [15] = 'invalid_guard_state',
  [16] = 'trading_state_unknown', [17] = 'invalid_guard_state', [18] = 'invalid_guard_state',
  [19] = 'invalid_guard_state',
}

-- The invalid_guard_state deny naming `key`.
local function broken_deny(key, permit_key, hold_key)
  local t = string.gsub(h.guard, '__KEY__', function() return key end)
  return guard_deny(t, 'global', permit_key, hold_key)
end

-- With the record off, entries carry no record values.
local stride = 4
if maxlen > 0 then stride = 11 end
local out, foreigners = {}, {}
local n = (#ARGV - 1) / stride
for i = 1, n do
  local a = 1 + (i - 1) * stride
  local k = 9 + (i - 1) * 5
  local pk, sk, xk, ak, aok = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5]
  local hk = HOLD_PREFIX .. string.sub(sk, #STATE_PREFIX + 1)
  local id, mode = ARGV[a + 1], ARGV[a + 2]
  -- The entry's own indexes, checked before anything is written.
  local index_broken, index_code = nil, 0
  if mode ~= '0' and mode ~= '1' and not dry then
    if broken_allows then
      index_broken, index_code = KEYS[7], 15
    elseif not zset_ok(ak) then
      index_broken, index_code = ak, 18
    elseif mode == '3' and broken_opens_index then
      index_broken, index_code = KEYS[9], 17
    elseif mode == '3' and not zset_ok(aok) then
      index_broken, index_code = aok, 19
    end
  end
  local guards = {}
  local foreign = ''
  local code
  local acked = redis.call('XACK', stream, group, id)
  local ptype = 'none'
  if acked ~= 0 and mode ~= '0' and not dry then ptype = redis.call('TYPE', pk).ok end
  if acked == 0 then
    code = 0
  elseif mode == '0' then
    code = 1
  elseif ptype == 'string' then
    code = 4
  else
    if ptype ~= 'none' then
      foreign = foreign_of(pk, ptype)
      table.insert(guards, '"replaced_foreign":' .. cjson.encode(foreign))
    end
    local body, res = ARGV[a + 3], 2
    if not armed then
      -- No gate has put the trading state in place on this Redis.
      table.insert(guards, '"armed":false')
      body, res = guard_deny(h.unknown, 'global', pk, hk), 16
    elseif mode ~= '1' then
      local state, scope, shift = global, 'global', 0
      local sym = stricter(state_of(sk, nil), known_sym[string.sub(hk, #HOLD_PREFIX + 1)])
      if sym and RANK[sym] > RANK[global] then state, scope, shift = sym, 'symbol', 1 end
      table.insert(guards, '"state":"' .. state .. '","scope":"' .. scope .. '"')
      if state == 'HALTED' then
        body, res = guard_deny(h.halted, scope, pk, hk), 5 + shift
      elseif state == 'REDUCING' and mode == '3' then
        body, res = guard_deny(h.reducing, scope, pk, hk), 7 + shift
      elseif mode ~= '4' then
        local t = redis.call('TYPE', hk).ok
        local held = false
        if t == 'string' then
          held = redis.call('STRLEN', hk) > 0
        elseif t ~= 'none' then
          held = true
        end
        table.insert(guards, '"hold":' .. tostring(held))
        if held then body, res = ARGV[a + 4], 3 end
      end
      if res == 2 and mode == '3' then
        -- A guard the opens need that cannot be read or written denies them.
        local broken, bcode = nil, 0
        if index_broken then
          broken, bcode = index_broken, index_code
        elseif broken_ctl then
          broken, bcode = KEYS[3], 14
        elseif broken_g then
          broken, bcode = KEYS[2], 11
        elseif max_s > 0 and not zset_ok(xk) then
          broken, bcode = xk, 12
        elseif broken_cap then
          broken, bcode = KEYS[4], 13
        end
        if broken then
          table.insert(guards, '"broken":' .. cjson.encode(broken))
          body, res = broken_deny(broken, pk, hk), bcode
        end
      end
      if res == 2 and mode == '3' then
        if max_g > 0 then
          local is_full, c = full(KEYS[2], max_g, win_g)
          table.insert(guards, '"opens_global":' .. c)
          if is_full then
            body, res = guard_deny(h.throttled_g, 'global', pk, hk), 9
            if latch and global == 'ACTIVE' and not dry then
              redis.call('SET', KEYS[1], 'REDUCING')
              local entry = redis.call('XADD', KEYS[3], '*', 'kind', 'change', 'scope', 'global', 'symbol', '',
                'from', 'ACTIVE', 'to', 'REDUCING', 'reason', h.latch_reason, 'actor', 'p33-auto',
                'ts', tostring(math.floor(now_ms / 1000)))
              redis.call('SET', KEYS[6], entry)
              global = 'REDUCING'
            end
          end
        end
        if res == 2 and max_s > 0 then
          local is_full, c = full(xk, max_s, win_s)
          table.insert(guards, '"opens_symbol":' .. c)
          if is_full then
            body, res = guard_deny(h.throttled_s, 'symbol', pk, hk), 10
          end
        end
        if res == 2 and cap > 0 then
          local flying = in_flight()
          table.insert(guards, '"positions":' .. positions .. ',"in_flight":' .. flying)
          if positions + flying >= cap then
            -- The quoted placeholders become bare numbers.
            local t = string.gsub(h.cap_tmpl, '"__POSITIONS__"', tostring(positions))
            t = string.gsub(t, '"__INFLIGHT__"', tostring(flying))
            body, res = guard_deny(t, 'global', pk, hk), 1000 + flying
          end
        end
        if res == 2 and not dry then
          if max_g > 0 then
            redis.call('ZADD', KEYS[2], now_ms, id)
            redis.call('PEXPIRE', KEYS[2], win_g)
          end
          if max_s > 0 then
            redis.call('ZADD', xk, now_ms, id)
            redis.call('PEXPIRE', xk, win_s)
          end
          if cap > 0 then
            local symbol = string.sub(hk, #HOLD_PREFIX + 1)
            redis.call('ZADD', KEYS[4], now_ms, symbol)
            redis.call('PEXPIRE', KEYS[4], ttl)
          end
        end
      end
    end
    if not dry then
      -- A foreign permit is no verdict: it is replaced in this same step.
      if ptype ~= 'none' then redis.call('DEL', pk) end
      redis.call('SET', pk, body, 'PX', ttl, 'NX')
      -- Every allow is indexed until it expires, so a halt can revoke it:
      -- globally and by symbol, and the opens apart (what a reduce walks).
      -- A close whose index is unusable is written unindexed (closes reduce
      -- risk); an open was denied above.
      if res == 2 and mode ~= '1' and not index_broken then
        if not indexed then
          redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', '(' .. now_ms)
          if not broken_opens_index then
            redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', '(' .. now_ms)
          end
          indexed = true
        end
        local plan = string.sub(pk, #PERMIT_PREFIX + 1)
        local symbol = string.sub(hk, #HOLD_PREFIX + 1)
        local until_ms = now_ms + ttl
        redis.call('ZADD', KEYS[7], until_ms, symbol .. '|' .. plan)
        redis.call('ZREMRANGEBYSCORE', ak, '-inf', '(' .. now_ms)
        redis.call('ZADD', ak, until_ms, plan)
        redis.call('PEXPIRE', ak, ttl)
        if mode == '3' then
          redis.call('ZADD', KEYS[9], until_ms, symbol .. '|' .. plan)
          redis.call('ZREMRANGEBYSCORE', aok, '-inf', '(' .. now_ms)
          redis.call('ZADD', aok, until_ms, plan)
          redis.call('PEXPIRE', aok, ttl)
        end
      end
    end
    code = res
  end
  out[i] = code
  if foreign ~= '' then
    table.insert(foreigners, i)
    table.insert(foreigners, foreign)
  end
  -- The record of every entry finished here (none for one another consumer
  -- had already finished).
  if maxlen > 0 and code ~= 0 then
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
      'config', h.config, 'version', h.version, 'consumer', h.consumer)
  end
end
if indexed then
  redis.call('PEXPIRE', KEYS[7], ttl)
  if not broken_opens_index and redis.call('EXISTS', KEYS[9]) == 1 then
    redis.call('PEXPIRE', KEYS[9], ttl)
  end
end
for _, v in ipairs(foreigners) do table.insert(out, v) end
return out
