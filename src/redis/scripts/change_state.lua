-- change_state.lua: one trading-state change and its control entry, both or
-- neither (SPEC §12). The control stream is checked before anything is
-- written (a stream of another type, or at its last possible ID, cannot
-- take the entry: MULTI/EXEC would have set the state all the same).
--
-- KEYS[1]  the state key (quantum:p33:trading_state[:<symbol>])
-- KEYS[2]  quantum:stream:p33.control
-- KEYS[3]  quantum:p33:latch (the throttle latch's own record; an operator's
--          global change ends the latch)
-- ARGV[1]  the new state, or NONE: delete the key (a symbol's resume)
-- ARGV[2]  scope: global or symbol          ARGV[3]  the symbol ('' global)
-- ARGV[4]  reason                           ARGV[5]  actor
-- ARGV[6]  ts (whole epoch s)
-- ARGV[7]  the state in force while the key is missing (the default, or
--          NONE for a symbol)
-- ARGV[8]  optional: the ID of the last control entry the restoring
--          instance has read. Given, this is a restore (SPEC §12): the state
--          is written only when the key still reads less strict than
--          ARGV[1] and no control entry came after that ID (a change the
--          instance has not read yet is never undone), and the latch's
--          record is left alone.
--
-- Returns {entry ID, from}; for a restore that had nothing to do, {'', from}
-- (or {'', 'MOVED'}: an entry came after ARGV[8]); an error reply
-- P33CONTROL <key> <why> when the control stream cannot take the entry
-- (nothing changed).

local why = stream_problem(KEYS[2])
if why then return redis.error_reply('P33CONTROL ' .. KEYS[2] .. ' ' .. why) end
local from = state_of(KEYS[1], ARGV[7])
local restore = ARGV[8] ~= nil
if restore then
  if #redis.call('XRANGE', KEYS[2], '(' .. ARGV[8], '+', 'COUNT', 1) > 0 then
    return {'', 'MOVED'}
  end
  if (RANK[from] or 0) >= (RANK[ARGV[1]] or 0) then return {'', from} end
end
if ARGV[1] == 'NONE' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
local id = redis.call('XADD', KEYS[2], '*', 'kind', 'change', 'scope', ARGV[2], 'symbol', ARGV[3],
  'from', from, 'to', ARGV[1], 'reason', ARGV[4], 'actor', ARGV[5], 'ts', ARGV[6])
if ARGV[2] == 'global' and not restore then redis.call('DEL', KEYS[3]) end
return {id, from}
