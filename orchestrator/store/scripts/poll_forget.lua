-- Drop a job's pending poll. KEYS: 1 due, 2 ready, 3 meta; ARGV: 1 job id
-- A pending poll has its meta entry (poll_put.lua writes it, poll_take.lua deletes it with the
-- poll): a job with none (most finishing jobs: their last poll was taken) costs one command.
if redis.call('HDEL', KEYS[3], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return 1
