-- read_universe.lua: the three universe keys in one round trip (SPEC §3).
--
-- KEYS[1]  the active document (string)      P33_UNIVERSE_KEY_ACTIVE
-- KEYS[2]  the meta hash                     P33_UNIVERSE_KEY_META
-- KEYS[3]  the last good document (string)   P33_UNIVERSE_KEY_LAST_OK
-- ARGV     none
--
-- Returns {{type, value}, meta, {type, value}}: a document's Redis type
-- ('none' when missing) and its value ('' unless a string); meta as a flat
-- HGETALL list, empty unless KEYS[2] is a hash. Reads only.

local function str(k)
  local t = redis.call('TYPE', k).ok
  if t == 'string' then return {t, redis.call('GET', k)} end
  return {t, ''}
end
local meta = {}
if redis.call('TYPE', KEYS[2]).ok == 'hash' then meta = redis.call('HGETALL', KEYS[2]) end
return {str(KEYS[1]), meta, str(KEYS[3])}
