-- apply_ledger.lua: one apply.result entry's ledger metadata and its ACK,
-- atomically (SPEC §8), so an entry is applied once across restarts.
--
-- KEYS[1]  quantum:position:ledger:<symbol> (an unused name when ARGV[4] is '0')
-- ARGV[1]  the result stream
-- ARGV[2]  the ledger group
-- ARGV[3]  the entry ID
-- ARGV[4]  '1' = write the metadata, '0' = ACK only
-- ARGV[5..9]  last_order_id, last_result_plan_id, last_executed_qty,
--             last_order_side, updated_at
--
-- Returns 0 when the entry was not pending (nothing written), 2 when the
-- ledger key holds another type than a hash (ACKed, nothing written: it is
-- checked before the ACK, since Redis keeps a script's writes made before
-- an error), else 1.
-- Never writes last_known_amt, ledger_amt or last_side: the executor and the
-- reconcile service own them.

local t = 'none'
if ARGV[4] == '1' then t = redis.call('TYPE', KEYS[1]).ok end
if redis.call('XACK', ARGV[1], ARGV[2], ARGV[3]) == 0 then return 0 end
if t ~= 'none' and t ~= 'hash' then return 2 end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'last_order_id', ARGV[5], 'last_result_plan_id', ARGV[6],
    'last_executed_qty', ARGV[7], 'last_order_side', ARGV[8], 'updated_at', ARGV[9])
  redis.call('EXPIRE', KEYS[1], 86400)
end
return 1
