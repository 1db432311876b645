-- read_state.lua: everything the rules read for a batch's symbols, in one
-- round trip (SPEC §5).
--
-- KEYS     per symbol, three keys in this order:
--            quantum:position:snapshot:<symbol>     (hash)
--            quantum:position:ledger:<symbol>       (hash)
--            quantum:cooldown:last_exec_ts:<symbol> (string, epoch ms)
-- ARGV     none
--
-- Returns one row per symbol: {snapshot type, snapshot HGETALL, ledger type,
-- ledger HGETALL, cooldown type, cooldown value}. A type is Redis's TYPE
-- ('none' when missing); a value is read only when the type is the expected
-- one, so a key of the wrong type is reported, never an error. Reads only.

local out = {}
for i = 1, #KEYS, 3 do
  local s, l, c = KEYS[i], KEYS[i + 1], KEYS[i + 2]
  local st, lt, ct = redis.call('TYPE', s).ok, redis.call('TYPE', l).ok, redis.call('TYPE', c).ok
  local sv, lv, cv = {}, {}, ''
  if st == 'hash' then sv = redis.call('HGETALL', s) end
  if lt == 'hash' then lv = redis.call('HGETALL', l) end
  if ct == 'string' then cv = redis.call('GET', c) end
  table.insert(out, {st, sv, lt, lv, ct, cv})
end
return out
