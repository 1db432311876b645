-- read_states.lua: trading-state keys read the way the write script reads
-- them (state_of, common.lua), atomically: a key deleted by a concurrent
-- change is simply missing, never a type error (SPEC §12).
--
-- KEYS     the keys to read (quantum:p33:trading_state, or a page of
--          quantum:p33:trading_state:<symbol> found by SCAN)
-- ARGV     none
--
-- Returns one value per key: ACTIVE, REDUCING or HALTED (any other value,
-- or another type, is HALTED), or '' when the key is missing.

local out = {}
for i = 1, #KEYS do
  out[i] = state_of(KEYS[i], '')
end
return out
