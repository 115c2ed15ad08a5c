//! Conversations as a Parquet table: `id`, `messages` (list of {role, content, weight}),
//! `chosen` / `rejected` ({role, content}, null unless a preference pair), `tools` and `meta` (JSON text).
//! Reading it back (convert, prepare, export) gives the same conversations.

use crate::output::AtomicFile;
use crate::record::{Conversation, Message};
use anyhow::Result;
use arrow_array::builder::{ArrayBuilder, Int8Builder, ListBuilder, StringBuilder, StructBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Fields, Schema};
use parquet::arrow::ArrowWriter;
use std::path::Path;
use std::sync::Arc;

fn message_fields() -> Fields {
    Fields::from(vec![
        Field::new("role", DataType::Utf8, false),
        Field::new("content", DataType::Utf8, false),
        Field::new("weight", DataType::Int8, true),
    ])
}

fn answer_fields() -> Fields {
    Fields::from(vec![Field::new("role", DataType::Utf8, true), Field::new("content", DataType::Utf8, true)])
}

pub fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new(
            "messages",
            DataType::List(Arc::new(Field::new("item", DataType::Struct(message_fields()), true))),
            false,
        ),
        Field::new("chosen", DataType::Struct(answer_fields()), true),
        Field::new("rejected", DataType::Struct(answer_fields()), true),
        Field::new("tools", DataType::Utf8, true),
        Field::new("meta", DataType::Utf8, true),
    ]))
}

pub struct ConversationParquet {
    writer: ArrowWriter<AtomicFile>,
}

impl ConversationParquet {
    pub fn create(out: &Path) -> Result<Self> {
        let file = AtomicFile::create(out)?;
        Ok(ConversationParquet { writer: ArrowWriter::try_new(file, schema(), Some(crate::output::parquet_props()))? })
    }

    pub fn write(&mut self, convs: &[Conversation]) -> Result<()> {
        if convs.is_empty() {
            return Ok(());
        }
        let mut ids = StringBuilder::new();
        let mut msgs = ListBuilder::new(StructBuilder::from_fields(message_fields(), 0))
            .with_field(Arc::new(Field::new("item", DataType::Struct(message_fields()), true)));
        let mut chosen = StructBuilder::from_fields(answer_fields(), convs.len());
        let mut rejected = StructBuilder::from_fields(answer_fields(), convs.len());
        let mut tools = StringBuilder::new();
        let mut meta = StringBuilder::new();
        for c in convs {
            ids.append_value(&c.id);
            for m in &c.messages {
                let s = msgs.values();
                s.field_builder::<StringBuilder>(0).expect("role").append_value(&m.role);
                s.field_builder::<StringBuilder>(1).expect("content").append_value(&m.content);
                s.field_builder::<Int8Builder>(2).expect("weight").append_option(m.weight.map(|w| w as i8));
                s.append(true);
            }
            msgs.append(true);
            append_answer(&mut chosen, c.chosen.as_ref());
            append_answer(&mut rejected, c.rejected.as_ref());
            tools.append_option(c.tools.as_ref().map(|t| t.to_string()));
            meta.append_option((!c.meta.is_empty()).then(|| serde_json::Value::Object(c.meta.clone()).to_string()));
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(ids.finish()),
            Arc::new(msgs.finish()),
            Arc::new(chosen.finish()),
            Arc::new(rejected.finish()),
            Arc::new(tools.finish()),
            Arc::new(meta.finish()),
        ];
        self.writer.write(&RecordBatch::try_new(schema(), cols)?)?;
        Ok(())
    }

    pub fn commit(self) -> Result<()> {
        let file = self.writer.into_inner()?;
        file.commit()
    }
}

fn append_answer(b: &mut StructBuilder, m: Option<&Message>) {
    let (role, content) = match m {
        Some(m) => (Some(m.role.as_str()), Some(m.content.as_str())),
        None => (None, None),
    };
    b.field_builder::<StringBuilder>(0).expect("role").append_option(role);
    b.field_builder::<StringBuilder>(1).expect("content").append_option(content);
    b.append(m.is_some());
    let _ = b.len();
}
